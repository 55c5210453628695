"""`plan`: what a run will do and need (steps, saves, GPU memory, host RAM, disk, hours) without training.

Every train and model flag works here as in `train`. Rows come from the parquet footers of `train_file`, or from
`--num_samples` (then the file need not exist yet). Memory and disk are in GiB (2^30 bytes: a "20 GB" card holds
20 GiB). How each figure is worked out is said next to it in the table and in `commands.plan_memory`.
"""
import os
import shutil

from commands.options import PlanFlags
from commands.plan_memory import GIB, GPU_BUDGET_BYTES, window_rows
from commands.plan_report import report
from config import with_resolved_paths
from utils.errors import UserError, UserErrors

# Below this share of the card left over, fragmentation of PyTorch's allocator may still run out.
TIGHT_SHARE = 0.1
SHORTER_SEQ_LENS = (160, 128, 96, 64)
# Host RAM besides what this process measures: the CUDA runtime, cuBLAS and cuDNN on the host side of a GPU
# process (0.8-1.5 GiB is typical), and a forked DataLoader worker's own pages beyond its data window.
CUDA_HOST_BYTES = GIB
WORKER_BYTES = GIB // 4
ASSUMED_ROW_BYTES = 1024  # stored bytes per row when no training file can be read (plans made with --num_samples)
TOKEN_ID_BYTES = 4  # the dataset keeps a window's token ids as int32
# Model directories and the state's weights: fp32 safetensors (the state adds the optimizer's own).
MODEL_BYTES_PER_PARAMETER = 4


def training_rows(cfg, num_samples: int) -> tuple[int, str]:
    from training.preflight import file_rows, text_columns

    if num_samples:
        return num_samples, "--num_samples"
    problems = []
    rows = file_rows("train_file", cfg.train_file, problems, text_columns(cfg))
    if not problems and rows == 0:
        problems.append(f"--train_file={cfg.train_file}: holds no rows")
    if problems:
        problems[-1] += " (plan without the file: --num_samples=ROWS)"
        raise UserErrors(problems)
    return rows, "parquet footers of --train_file"


def stored_row_bytes(cfg) -> float | None:
    """Uncompressed bytes per row from the parquet footers (about the size of the rows in Arrow), if readable."""
    from config import split_paths
    from data_pipeline.parquet import expand_paths, read_footer
    from training.preflight import text_columns

    try:
        footers = [read_footer(path, text_columns(cfg)) for path in expand_paths(split_paths(cfg.train_file))]
    except UserError:
        return None
    rows = sum(footer.num_rows for footer in footers)
    return sum(footer.uncompressed_bytes for footer in footers) / rows if rows else None


SAMPLED_DOCUMENTS = 2000  # documents tokenized to estimate the tokens of a corpus whose counts are not kept yet


def packing(cfg, rows: int, rows_source: str) -> dict | None:
    """Span corruption: the chunks the documents pack into, exactly from the token counts a run keeps in
    output_dir (same files and tokenizer), else estimated from the tokens of the first documents."""
    if cfg.objective != "span_corruption":
        return None
    import math

    from config import split_paths
    from data_pipeline.tokenize import shared_encoder
    from data_pipeline.packed_text import counts_dir_of
    from data_pipeline.parquet import expand_paths, first_usable_rows
    from data_pipeline.span_corruption import corruption_of
    from data_pipeline.token_counts import RunningTotals, document_lengths
    from model.tokenizer import has_tokenizer, load_tokenizer
    from training.feed import token_counts_files

    corruption = corruption_of(cfg)
    length = corruption.chunk_length(cfg.max_seq_len)
    tokenizer = load_tokenizer(cfg.tokenizer_dir) if has_tokenizer(cfg.tokenizer_dir) else None
    if rows_source == "--num_samples":
        raise UserError("--num_samples with --objective=span_corruption: the chunks depend on the documents' "
                        "tokens; plan with a readable --train_file")
    paths = expand_paths(split_paths(cfg.train_file))
    kept = token_counts_files(cfg, tokenizer) if tokenizer else []
    encoder = shared_encoder(tokenizer, None) if tokenizer else None
    if kept and all(map(os.path.exists, kept)):
        tokens = sum(int(RunningTotals(path).before(-1)[0]) for path in kept)
        source = f"token counts kept in {counts_dir_of(cfg.output_dir)}"
    else:
        import pyarrow as pa

        sample = first_usable_rows(paths[0], SAMPLED_DOCUMENTS, (cfg.text_column,))[0]
        if not sample:
            raise UserError(f"--train_file={cfg.train_file}: {paths[0]} has no document with text in column "
                            f"'{cfg.text_column}'")
        lengths = document_lengths(encoder, pa.array(sample)) if encoder else [len(text) + 1 for text in sample]
        tokens = round(rows * sum(lengths) / len(sample))
        # (Every row is taken for a document like the sampled ones: empty documents make this an upper bound.)
        source = (f"estimated from the first {len(sample):,} documents"
                  + ("" if encoder else ", one token per character (no tokenizer yet)"))
    return dict(chunks=max(1, math.ceil(tokens / length)), tokens=tokens, chunk_length=length,
                input_length=corruption.input_length(length), target_length=corruption.target_length(length),
                source=source)


def target_length(cfg, seq_len: int) -> int | None:
    """The decoder's tokens when they are not `seq_len`: span corruption's targets are about a quarter of it."""
    if cfg.objective != "span_corruption":
        return None
    from data_pipeline.span_corruption import corruption_of

    corruption = corruption_of(cfg)
    return corruption.target_length(corruption.chunk_length(seq_len))


def schedule(cfg, samples: int, num_processes: int) -> dict:
    """Optimizer steps and the events the trainer ties to them (see `training.loop.fit`)."""
    from data_pipeline.batch import global_batch_size, steps_per_epoch

    global_batch = global_batch_size(cfg.batch_size_per_gpu, num_processes, cfg.gradient_accumulation_steps)
    per_epoch = steps_per_epoch(samples, global_batch)
    schedule_steps = cfg.epochs * per_epoch  # the learning-rate schedule's length; max_steps never changes it
    total = min(schedule_steps, cfg.max_steps) if cfg.max_steps else schedule_steps
    # Evaluation and save at every save_steps, and at each epoch end unless one just happened at that step.
    epoch_ends = [e * per_epoch for e in range(1, cfg.epochs + 1) if e * per_epoch <= total]
    saves = total // cfg.save_steps + sum(1 for step in epoch_ends if step % cfg.save_steps)
    return dict(num_processes=num_processes, global_batch_size=global_batch, steps_per_epoch=per_epoch,
                epochs=cfg.epochs, schedule_steps=schedule_steps, total_steps=total, warmup_steps=cfg.warmup_steps,
                saves=saves, evaluations=saves if cfg.eval_max_samples else 0,
                logging_lines=total // cfg.logging_steps,
                memory_lines=total // cfg.memory_log_steps if cfg.memory_log_steps else 0)


def vocabulary(cfg) -> tuple[int, str]:
    from training.preflight import check_tokenizer

    problems = []
    size = check_tokenizer(cfg, problems)
    if problems:
        raise UserErrors(problems)
    if size:
        return size, f"the tokenizer in {cfg.tokenizer_dir}"
    return cfg.vocab_size, f"--vocab_size (no tokenizer in {cfg.tokenizer_dir} yet)"


def answers_per_row(cfg) -> int:
    """Decoder rows per encoder row: a preference pair's prompt has two answers."""
    return 2 if cfg.objective == "dpo" else 1


def measure_activations(cfg, model_cfg, vocab: int, parameters: int, probe: bool, notes: list, rows=None,
                        answers=None):
    """Activation bytes of the configured micro-batch (or of `rows` rows with `answers` answers each), how they were
    found, and the analytic model for what-ifs."""
    from commands.plan_memory import AnalyticActivations, ProbedActivations

    rows, answers = rows or cfg.batch_size_per_gpu, answers or answers_per_row(cfg)
    shape = (rows, cfg.max_seq_len, target_length(cfg, cfg.max_seq_len), answers)
    analytic = AnalyticActivations(model_cfg, vocab, cfg.mixed_precision, parameters)
    if probe:
        try:
            probed = ProbedActivations(model_cfg, vocab, cfg.mixed_precision, frozen=cfg.freeze)
            return probed.bytes(*shape), "probe", analytic
        except Exception as error:  # the probe relies on torch internals; a changed one must not cost the plan
            notes.append(f"the memory probe failed ({type(error).__name__}: {error}); activations are analytic")
    return analytic.bytes(*shape), "analytic", analytic


def preference_plan(cfg, model_cfg, vocab: int, parameters: int, gpu: dict, probe: bool, notes: list) -> dict | None:
    """DPO: its step beside a fine-tuning step of as many answers, and what a second (reference) model would hold."""
    if cfg.objective != "dpo":
        return None
    sft_rows = 2 * cfg.batch_size_per_gpu
    sft_activations, _, _ = measure_activations(cfg, model_cfg, vocab, parameters, probe, notes, sft_rows, 1)
    return dict(pairs=cfg.batch_size_per_gpu, activations=gpu["parts"]["activations"], sft_rows=sft_rows,
                sft_activations=sft_activations, second_model=MODEL_BYTES_PER_PARAMETER * parameters)


def torch_sees_a_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_plan(cfg, model_cfg, vocab: int, parameters: int, trainable: int, optimizer_bytes: int, probe: bool,
             notes: list, on_cpu: bool = False) -> dict:
    """What the device holds: the model, its gradients, the optimizer state and the activations. On a CPU they are
    in host RAM, with no CUDA context and no 20 GB card to fit."""
    from commands.plan_memory import gpu_memory

    activations, method, analytic = measure_activations(cfg, model_cfg, vocab, parameters, probe, notes)
    rows, seq = cfg.batch_size_per_gpu, cfg.max_seq_len
    parts = gpu_memory(parameters, trainable, optimizer_bytes, activations)
    if on_cpu:
        parts["cuda_context"] = 0
    total = sum(parts.values())
    if on_cpu:
        return dict(parts=parts, total=total, method=method, suggestions=[])

    def total_with(other_rows: int, other_seq: int) -> int:
        # What-ifs scale the measured activations by the analytic model's ratio: no further probe needed.
        answers = answers_per_row(cfg)
        return total - activations + round(
            activations * analytic.bytes(other_rows, other_seq, target_length(cfg, other_seq), answers)
            / analytic.bytes(rows, seq, target_length(cfg, seq), answers))

    suggestions = []
    if total > GPU_BUDGET_BYTES:
        accumulation = cfg.gradient_accumulation_steps
        smaller = next((d for d in range(rows - 1, 0, -1)
                        if rows % d == 0 and total_with(d, seq) <= GPU_BUDGET_BYTES), None)
        if smaller:
            suggestions.append(f"--batch_size_per_gpu={smaller} --gradient_accumulation_steps="
                               f"{accumulation * rows // smaller} (the same global batch): about "
                               f"{total_with(smaller, seq) / GIB:.1f} GiB")
        shorter = next((s for s in SHORTER_SEQ_LENS if s < seq and total_with(rows, s) <= GPU_BUDGET_BYTES), None)
        if shorter:
            suggestions.append(f"--max_seq_len={shorter} (longer texts are truncated): about "
                               f"{total_with(rows, shorter) / GIB:.1f} GiB")
    elif GPU_BUDGET_BYTES - total < TIGHT_SHARE * GPU_BUDGET_BYTES:
        suggestions.append("under 10% of the card is left for the allocator's fragmentation; should CUDA run out "
                           "of memory, the trainer retries with a smaller micro-batch (same global batch)")
    return dict(parts=parts, total=total, method=method, suggestions=suggestions)


def host_ram_plan(cfg, parameters: int, row_bytes: float, tokens_per_row: float, rows: int, on_cpu: bool = False
                  ) -> dict:
    """The host's share besides the device's: on a CPU the model lives in RAM already (counted with the device's
    parts), and there is no CUDA runtime."""
    import psutil
    import torch

    from training.runtime import decide

    # The window being trained on and the one read ahead: text and token ids, once more while they are reordered.
    window = 2 * window_rows(cfg, rows) * (row_bytes + 2 * tokens_per_row * TOKEN_ID_BYTES)
    workers, ram = decide(cfg).num_workers, psutil.virtual_memory().total  # as the trainer decides on this machine
    parts = {
        "libraries": psutil.Process().memory_info().rss,
        "cuda_runtime": 0 if on_cpu else CUDA_HOST_BYTES,
        "model_copy": 0 if on_cpu else MODEL_BYTES_PER_PARAMETER * parameters,
        "data_window": round(window),
        "workers": round(workers * (WORKER_BYTES + window)),
    }
    how = (f" (auto: {ram / GIB:.0f} GiB of RAM and {'a' if torch.cuda.is_available() else 'no'} GPU here; 0 "
           "below 15 GiB or without a GPU, else 2)" if cfg.num_workers == "auto" else "")
    return dict(parts=parts, total=sum(parts.values()), workers=workers, workers_note=f"{workers} workers{how}")


def disk_plan(cfg, parameters: int, optimizer_bytes: int) -> dict:
    from training.preflight import nearest_existing

    model = MODEL_BYTES_PER_PARAMETER * parameters
    parts = {"best_models": cfg.keep_latest_n_ckp * model, "final": model, "state": 2 * (model + optimizer_bytes)}
    free = shutil.disk_usage(nearest_existing(cfg.output_dir)).free
    return dict(parts=parts, total=sum(parts.values()), free=free, model=model)


def run_plan(flags: PlanFlags, cfg, model_cfg, given=frozenset()) -> None:
    import math

    from model.t5 import estimate_parameters, parameter_shapes
    from training.init_from import starting_settings
    from training.optim import state_bytes
    from utils.distributed import ONE_PROCESS

    cfg, model_cfg = starting_settings(with_resolved_paths(cfg), model_cfg, given, ONE_PROCESS)
    rows, rows_source = training_rows(cfg, flags.num_samples)
    packed = packing(cfg, rows, rows_source)
    row_bytes = stored_row_bytes(cfg)
    notes = [] if row_bytes else [f"no readable --train_file: assuming {ASSUMED_ROW_BYTES} bytes per row"]
    steps = schedule(cfg, packed["chunks"] if packed else rows, flags.num_processes)
    if cfg.warmup_steps >= steps["schedule_steps"]:
        notes.append(f"--warmup_steps={cfg.warmup_steps} is not below the schedule's {steps['schedule_steps']} "
                     "steps: the learning rate never reaches --learn_rate")
    vocab, vocab_source = vocabulary(cfg)
    parameters = estimate_parameters(model_cfg, vocab)
    trained_shapes = parameter_shapes(model_cfg, vocab, cfg.freeze)
    trainable = sum(math.prod(shape) for shape in trained_shapes)
    optimizer_bytes = state_bytes(cfg.optimizer, trained_shapes)
    tokens_per_row = packed["tokens"] / rows if packed else 2 * cfg.max_seq_len
    on_cpu = flags.device == "cpu"
    host = host_ram_plan(cfg, parameters, row_bytes or ASSUMED_ROW_BYTES, tokens_per_row, rows,
                         on_cpu)  # before the probe
    gpu = gpu_plan(cfg, model_cfg, vocab, parameters, trainable, optimizer_bytes, flags.probe, notes, on_cpu)
    if not on_cpu and not torch_sees_a_gpu():
        notes.append("planned for GPUs; this machine has none: --device=cpu plans a run on its CPU")
    plan = dict(cfg=cfg, device=flags.device, steps=steps, rows=rows, rows_source=rows_source, packing=packed, vocab=vocab,
                vocab_source=vocab_source, parameters=parameters, trainable=trainable, gpu=gpu, host=host,
                disk=disk_plan(cfg, parameters, optimizer_bytes), notes=notes, step_time=flags.step_time or None,
                preference=preference_plan(cfg, model_cfg, vocab, parameters, gpu, flags.probe, notes))
    printed = report(plan)
    print(printed.json() if flags.json else printed.text())
