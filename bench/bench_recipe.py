"""Learning recipes compared per step: held-out loss after equal steps on the same real rows, in one run.

    python bench/bench_recipe.py                       # both scales, 300 steps, and the 1,500-step run
    python bench/bench_recipe.py --scales small --steps 300 --long_steps 0 --recipes ours,original

Every recipe trains the same model (same seed, same initial weights) on the same batches of the shared sample rows
(`../shared/data/sample_train_3k.parquet`, 3,000 real Chinese Q&A rows; the tokenizer is trained on them) through
the trainer's own step (`training.step.StepRunner`: token-summed loss, clipping at 1.0), and is scored on the held-out
`sample_valid_1k.parquet` (token cross-entropy of every response given its prompt, teacher-forced) at five points.
The recipes:

  ours        the default --optimizer with the contract's schedule (warmup, cosine to 0.1x) at learn_rate 1e-4
  adafactor   --optimizer=adafactor (the original project's Adafactor, under the contract's schedule)
  adamw       --optimizer=adamw at the guide's learn_rate 1e-4 (the tool's default before this benchmark)
  original    the original project exactly: Adafactor with relative step min(1e-2, 1/sqrt(t)) and parameter
              scaling, no warmup and no decay (its learning-rate flags were ignored)
  hf          Hugging Face Seq2SeqTrainer's defaults: AdamW 5e-5, no warmup, linear decay to 0, no weight decay
  nanot5      nanoT5's: AdamW whose step is scaled by each tensor's RMS, 2e-2, warmup from 0.5x, cosine to 1e-5

Warmup is 10% of the steps for every recipe that has one. Dropout 0.1 (T5's), fp32, CPU.
"""
import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402

from config import T5ModelConfig, TrainConfigPretrainLarge  # noqa: E402
from data_pipeline.batch import MicroBatch  # noqa: E402
from data_pipeline.pairs import PairDataset  # noqa: E402
from data_pipeline.windows import StreamSpec  # noqa: E402
from model.loss import padded, token_loss_sum  # noqa: E402
from data_pipeline.parquet import first_usable_rows  # noqa: E402
from model.t5 import build_model, count_parameters  # noqa: E402
from model.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from training.optim import DEFAULT_OPTIMIZER, build_optimizer  # noqa: E402
from training.schedule import learning_rate  # noqa: E402
from training.state import TrainingState  # noqa: E402
from training.step import StepRunner  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
SCALES = {
    "tiny": dict(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=1, num_decoder_layers=1),  # smoke runs
    "small": dict(d_model=128, d_ff=512, num_heads=4, d_kv=32, num_layers=2, num_decoder_layers=2),
    "medium": dict(d_model=256, d_ff=1024, num_heads=4, d_kv=64, num_layers=4, num_decoder_layers=4),
    "large": dict(d_model=512, d_ff=2048, num_heads=8, d_kv=64, num_layers=4, num_decoder_layers=4),
}
RECIPES = ("ours", "adafactor", "adamw", "original", "hf", "nanot5")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="small,medium", help=f"comma-separated, of {', '.join(SCALES)}")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps at every scale")
    parser.add_argument("--long_steps", type=int, default=1500, help="a longer run at the first scale (0: none)")
    parser.add_argument("--long_batch_size", type=int, default=8,
                        help="its batch: 1,500 steps of 8 rows pass over the 3,000 rows 4 times (of 32: 16 times)")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_len", type=int, default=64)
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--train_rows", type=int, default=0, help="0: all 3,000 sample rows")
    parser.add_argument("--valid_rows", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


class ScaledAdamW(torch.optim.Optimizer):
    """nanoT5's recipe as its paper describes it: AdamW with bias correction whose step for each tensor is the rate
    times max(1e-3, RMS of the tensor)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-6):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                state["m"].lerp_(p.grad, 1 - beta1)
                state["v"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                correction = math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                scale = max(1e-3, float(p.norm()) / p.numel() ** 0.5)
                p.addcdiv_(state["m"], state["v"].sqrt().add_(group["eps"]), value=-group["lr"] * correction * scale)


def warmup_cosine(peak: float, steps: int, warmup: int, final: float, start: float = 0.0):
    def rate(step: int) -> float:
        if step < warmup:
            return peak * (start + (1 - start) * step / warmup)
        progress = min(1.0, (step - warmup) / max(1, steps - 1 - warmup))
        return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))
    return rate


def recipe(name: str, model, steps: int):
    """(optimizer, rate of the step after `s` steps) for one recipe; the rate is the optimizer's own."""
    cfg = TrainConfigPretrainLarge()
    warmup = round(0.1 * steps)
    if name in ("ours", "adafactor", "adamw"):
        optimizer = build_optimizer(model, DEFAULT_OPTIMIZER if name == "ours" else name, cfg.weight_decay)
        state = TrainingState(schedule_total_steps=steps)

        def contract(step: int) -> float:  # in learn_rate's units: the optimizer's groups scale it
            state.global_step = step
            return learning_rate(state, cfg.learn_rate, warmup)
        return optimizer, contract
    if name == "original":
        # torch's Adafactor is the original's: lr caps the relative step, which is min(lr, 1/sqrt(t)).
        return torch.optim.Adafactor(model.parameters(), lr=1e-2), lambda step: 1e-2
    if name == "hf":
        return torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0), lambda step: 5e-5 * (1 - step / steps)
    if name == "nanot5":
        return ScaledAdamW(model.parameters(), lr=2e-2), warmup_cosine(2e-2, steps, warmup, 1e-5, start=0.5)
    raise SystemExit(f"unknown recipe {name!r}; the recipes are {', '.join(RECIPES)}")


def held_out_batches(tokenizer, args) -> list[MicroBatch]:
    prompts, responses = first_usable_rows(str(SHARED / "sample_valid_1k.parquet"), args.valid_rows)
    encode = lambda texts: tokenizer(texts, truncation=True, max_length=args.max_seq_len)["input_ids"]  # noqa: E731
    prompt_ids, response_ids = encode(prompts), encode(responses)
    batches = []
    for start in range(0, len(prompt_ids), 100):
        input_ids = padded(prompt_ids[start:start + 100], tokenizer.pad_token_id)
        batches.append(MicroBatch.of(input_ids, (input_ids != tokenizer.pad_token_id).long(),
                                  padded(response_ids[start:start + 100], -100)))
    return batches


@torch.no_grad()
def held_out_loss(model, batches: list[MicroBatch]) -> float:
    model.eval()
    total = tokens = 0.0
    for batch in batches:
        loss, count = token_loss_sum(model, batch.input_ids, batch.attention_mask, batch.labels)
        total, tokens = total + float(loss), tokens + float(count)
    model.train()
    return total / tokens


def train_steps(tokenizer, train_file: str, batch_size: int, args):
    """The same sequence of step batches for every recipe: the trainer's data pipeline, epoch after epoch."""
    dataset = PairDataset(StreamSpec([train_file], args.max_seq_len, batch_size, buffer_size=3000, seed=0,
                                     ultra_low_mem=False), tokenizer)
    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        yield from dataset
        epoch += 1


def run_recipe(name: str, scale: str, steps: int, batch_size: int, tokenizer, train_file: str, valid,
               args) -> tuple[list, float]:
    set_seed(0)
    model = build_model(T5ModelConfig(**SCALES[scale], dropout_rate=0.1), tokenizer)
    optimizer, rate_at = recipe(name, model, steps)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    stepper = StepRunner(accelerator, model, optimizer, max_grad_norm=1.0)
    points = [round(steps * (i + 1) / 5) for i in range(5)]
    curve, started = [], time.time()
    for step, batch in zip(range(steps), train_steps(tokenizer, train_file, batch_size, args)):
        outcome = stepper.run(batch, rate_at(step))
        if not outcome.finite:
            print(f"    {name}: non-finite loss at step {step + 1}", flush=True)
        if step + 1 in points:
            curve.append(held_out_loss(model, valid))
    return curve, time.time() - started


def rows_of(path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def report(title: str, results: dict, steps: int) -> None:
    """The curves, the lowest point of each (what a run's best-k keeps), and ours against the best other."""
    points = [round(steps * (i + 1) / 5) for i in range(5)]
    print(f"\n{title}: held-out loss (nats per response token) after ... steps")
    print(f"  {'recipe':<10}" + "".join(f"{p:>9}" for p in points) + f"{'lowest':>9}{'minutes':>9}")
    for name, (curve, seconds) in results.items():
        print(f"  {name:<10}" + "".join(f"{value:9.3f}" for value in curve) + f"{min(curve):9.3f}{seconds / 60:9.1f}")
    others = [curve for name, (curve, _) in results.items() if name != "ours"]
    if "ours" in results and others:
        ours = results["ours"][0]
        print(f"  ours - best other recipe at step {steps}: {ours[-1] - min(c[-1] for c in others):+.3f}; "
              f"lowest along the run: {min(ours) - min(min(c) for c in others):+.3f}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    train_file = SHARED / "sample_train_3k.parquet"
    if not train_file.is_file():
        raise SystemExit(f"needs the shared sample rows: {train_file} is missing")
    with tempfile.TemporaryDirectory(prefix="bench_recipe_") as scratch:
        if args.train_rows:
            import pyarrow.parquet as pq
            rows = pq.read_table(train_file).slice(0, args.train_rows)
            train_file = Path(scratch) / "train.parquet"
            pq.write_table(rows, train_file)
        train_tokenizer([str(train_file)], Path(scratch) / "tokenizer", vocab_size=args.vocab_size, max_rows=None)
        tokenizer = load_tokenizer(Path(scratch) / "tokenizer")
        valid = held_out_batches(tokenizer, args)
        names = args.recipes.split(",")
        scales = args.scales.split(",")
        runs = [(scale, args.steps, args.batch_size) for scale in scales]
        if args.long_steps:
            runs.append((scales[0], args.long_steps, args.long_batch_size))
        print(f"default optimizer (ours): {DEFAULT_OPTIMIZER}; sequences of {args.max_seq_len} tokens, vocabulary "
              f"{len(tokenizer)}, {args.threads} threads", flush=True)
        for scale, steps, batch_size in runs:
            size = count_parameters(build_model(T5ModelConfig(**SCALES[scale]), tokenizer)) / 1e6
            results = {}
            for name in names:
                results[name] = run_recipe(name, scale, steps, batch_size, tokenizer, str(train_file), valid, args)
                print(f"  {scale} {steps} steps {name}: {' '.join(f'{v:.3f}' for v in results[name][0])}",
                      flush=True)
            epochs = steps * batch_size / rows_of(train_file)
            report(f"{scale} ({SCALES[scale]['d_model']} wide, {SCALES[scale]['num_layers']}+"
                   f"{SCALES[scale]['num_decoder_layers']} layers, {size:.1f}M parameters), {steps} steps of "
                   f"{batch_size} rows ({epochs:.1f} passes over the rows)", results, steps)


if __name__ == "__main__":
    main()
