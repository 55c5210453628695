"""CPU tokens/s of greedy answers: transformers' `generate` against the model exported to CTranslate2 (fp32, int8).

    python bench/bench_export.py --threads 1                  # trains a demo model first (~1 min), 4 min in all
    python bench/bench_export.py --model_dir model_save/demo/final
    python bench/bench_export.py --smoke                      # tiny sizes, under 20 s: the script works, no figures

Two models, both exported with `commands.export.export_model` (what `export` runs):
* the demo model (trained here with `demo` unless --model_dir is given) on the demo's validation prompts: it
  decides its answers' lengths, and both fp32 engines give the same answers, hence the same tokens;
* a model of the large config's shape (T5ModelConfig's defaults: d_model 768, 10 + 10 layers) with random weights
  and the demo model's tokenizer, forced to answer exactly --answer_tokens tokens (transformers:
  min_new_tokens = max_new_tokens; CTranslate2: min_decoding_length = max_decoding_length), so that every engine
  does the same work. Its vocabulary is the demo's, so the output layer is cheaper than a 32k vocabulary's.

Each model answers --prompts prompts in one batch, then --single_prompts of them one at a time (batch 1), each
timing repeating its prompts until --min_seconds have passed. The engines alternate within each of --rounds rounds
and each keeps its best rate (the machine is shared). Tokens are the answers' tokens without [EOS], counted from
each engine's output over all the repetitions. torch and CTranslate2 both get --threads threads
(torch.set_num_threads, intra_threads).
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from commands.demo import demo_rows  # noqa: E402
from commands.export import export_model  # noqa: E402
from inference.ctranslate2 import greedy_ids, load_translator  # noqa: E402
from config import T5ModelConfig, resolve_path  # noqa: E402

SMOKE_DEMO = ["--train_rows=64", "--valid_rows=16", "--epochs=1", "--eval_batch_size=16", "--d_model=32",
              "--d_ff=64", "--num_heads=2", "--d_kv=16", "--num_layers=1", "--num_decoder_layers=1"]
SMOKE_SHAPE = T5ModelConfig(d_model=64, d_ff=128, num_heads=2, d_kv=32, num_layers=2, num_decoder_layers=2)
ENGINES = ("transformers", "ctranslate2 fp32", "ctranslate2 int8")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", help="a saved demo-sized model (default: train one with `demo`)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of either engine")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; each engine keeps its best")
    parser.add_argument("--prompts", type=int, default=50, help="prompts of the batched runs")
    parser.add_argument("--single_prompts", type=int, default=10, help="prompts answered one at a time")
    parser.add_argument("--answer_tokens", type=int, default=32, help="the large-shape model's answer length")
    parser.add_argument("--max_new_tokens", type=int, default=24, help="the demo model's longest answer")
    parser.add_argument("--min_seconds", type=float, default=1.0, help="each timing repeats its prompts this long")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.prompts, args.single_prompts, args.answer_tokens, args.min_seconds = 1, 8, 2, 4, 0.0
    return args


def answer_lengths(rows, eos_id: int) -> list[int]:
    """Tokens of each answer up to (without) its first [EOS]."""
    return [row.index(eos_id) if eos_id in row else len(row) for row in rows]


def transformers_engine(model_dir: str):
    import torch

    from inference.saved_model import load_saved_model

    model, tokenizer = load_saved_model(model_dir)

    def answer(prompts: list[str], max_new_tokens: int, min_new_tokens: int) -> int:
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            output = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                    min_new_tokens=min_new_tokens)
        return sum(answer_lengths(output[:, 1:].tolist(), tokenizer.eos_token_id))  # column 0: the decoder start
    return answer


def ctranslate2_engine(export_dir: str, threads: int):
    translator, tokenizer = load_translator(export_dir, threads=threads, device="cpu")

    def answer(prompts: list[str], max_new_tokens: int, min_new_tokens: int) -> int:
        rows = greedy_ids(translator, tokenizer, prompts, max_new_tokens, min_new_tokens)
        return sum(answer_lengths(rows, tokenizer.eos_token_id))
    return answer


def measure(engines: dict, prompts: list[str], batch: int, max_new_tokens: int, fixed: bool, rounds: int,
            min_seconds: float) -> dict:
    """{engine: (tokens, best seconds)} for the prompts answered `batch` at a time, as often as it takes to fill
    `min_seconds` (a pass of a few milliseconds alone would be timer noise)."""
    best = {}
    for _ in range(rounds):
        for name, answer in engines.items():
            started, tokens, passes = time.perf_counter(), 0, 0
            while not passes or time.perf_counter() - started < min_seconds:
                for start in range(0, len(prompts), batch):
                    tokens += answer(prompts[start:start + batch], max_new_tokens, max_new_tokens if fixed else 0)
                passes += 1
            seconds = time.perf_counter() - started
            if fixed and tokens != passes * len(prompts) * max_new_tokens:
                raise SystemExit(f"{name}: {tokens} tokens, not {passes} x {len(prompts)} x {max_new_tokens}")
            if name not in best or tokens / seconds > best[name][0] / best[name][1]:
                best[name] = (tokens, seconds)
    return best


def train_demo(work: Path, smoke: bool) -> str:
    command = [sys.executable, str(REPO / "train_low_mem.py"), "demo", f"--output_dir={work / 'demo'}",
               f"--log_dir={work / 'logs'}"] + (SMOKE_DEMO if smoke else [])
    print(f"training a demo model: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return str(work / "demo" / "final")


def random_large_model(tokenizer_dir: str, out: Path, shape: T5ModelConfig) -> tuple[str, int]:
    import torch

    from model.t5 import build_model, count_parameters
    from model.tokenizer import load_tokenizer
    from utils.log import quiet_libraries

    quiet_libraries()  # save_pretrained's progress bar
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(shape, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out), count_parameters(model)


def engines_for(model_dir: str, work: Path, threads: int) -> dict:
    for quantization in ("none", "int8"):
        export_model(model_dir, str(work / quantization), quantization)
    return {"transformers": transformers_engine(model_dir),
            "ctranslate2 fp32": ctranslate2_engine(str(work / "none"), threads),
            "ctranslate2 int8": ctranslate2_engine(str(work / "int8"), threads)}


def table_rows(label: str, batch: int, figures: dict) -> list[str]:
    base = figures["transformers"][0] / figures["transformers"][1]
    rows = []
    for name in ENGINES:
        tokens, seconds = figures[name]
        rate = tokens / seconds
        rows.append(f"| {label} | {batch} | {name} | {tokens:,} | {seconds:.3f} | {rate:,.0f} | {rate / base:.2f}x |")
    return rows


def main() -> None:
    args = parse_args()
    import ctranslate2
    import torch

    torch.set_num_threads(args.threads)
    prompts = demo_rows(args.prompts, seed=2)[0]  # the demo's validation prompts (its data/valid.parquet)
    shape = SMOKE_SHAPE if args.smoke else T5ModelConfig()
    lines = ["| model | batch | engine | tokens | s | tokens/s | vs transformers |", "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        work = Path(tmp)
        demo_dir = resolve_path(args.model_dir) if args.model_dir else train_demo(work, args.smoke)
        large_dir, parameters = random_large_model(demo_dir, work / "large", shape)
        models = [(f"demo, answers up to {args.max_new_tokens} tokens", demo_dir, args.max_new_tokens, False),
                  (f"large shape ({parameters / 1e6:.1f}M parameters), answers of {args.answer_tokens} tokens",
                   large_dir, args.answer_tokens, True)]
        for index, (label, model_dir, max_new_tokens, fixed) in enumerate(models):
            engines = engines_for(model_dir, work / f"export{index}", args.threads)
            for batch, count in ((len(prompts), len(prompts)), (1, args.single_prompts)):
                print(f"timing {label}, batch {batch}", file=sys.stderr, flush=True)
                figures = measure(engines, prompts[:count], batch, max_new_tokens, fixed, args.rounds,
                                  args.min_seconds)
                lines += table_rows(label, batch, figures)
    heading = "SMOKE RUN (tiny sizes: not figures)\n" if args.smoke else ""
    print(f"{heading}CPU, {args.threads} thread(s) per engine, best of {args.rounds} round(s), "
          f"torch {torch.__version__}, ctranslate2 {ctranslate2.__version__}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
