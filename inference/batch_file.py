"""`generate --file=prompts.parquet --output=answers.parquet`: every row answered, in bounded memory, resumable.

The input is read one window of `part_rows` rows at a time (never the whole file). Each window's prompts are
answered in batches of similar length (less padding), and the window is written, with its input columns and the
new `answer` column, as one part file in OUTPUT.parts/: under a temporary name, flushed, then renamed, so a part
on disk is always complete. OUTPUT.parts/job.json records what decides the answers (input file, model, engine,
decoding settings, batch and part sizes): the same command run again after an interruption skips the finished
parts and carries on, any other refuses to mix its answers in. Once every part is written they are joined into
OUTPUT (again through a temporary name) whose parquet metadata holds the same record, and the parts go.
"""
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, replace

import pyarrow as pa
import pyarrow.parquet as pq

from config import DecodingSettings
from data_pipeline.parquet import open_parquet, read_footer
from inference.decoding import resolved_seed
from utils.atomic import TMP_PREFIX, fsync_dir, write_json_atomically
from utils.errors import UnreadableData, UserError

ANSWER_COLUMN = "answer"
JOB_FILE = "job.json"
METADATA_KEY = b"train_low_mem.generate"
READ_ROWS = 1024  # rows per read of the input: a window is assembled from reads of at most this many


@dataclass(frozen=True)
class FileJob:
    """One `generate --file` run, with absolute paths."""

    input: str
    output: str
    prompt_column: str
    model_dir: str
    engine: str
    settings: DecodingSettings
    batch_size: int
    part_rows: int

    @property
    def parts_dir(self) -> str:
        return self.output + ".parts"

    def identity(self) -> dict:
        """Everything that decides the answers: a run resumes, or counts as done, only under the same."""
        stat = os.stat(self.input)
        return dict(input=self.input, input_bytes=stat.st_size, input_mtime_ns=stat.st_mtime_ns,
                    prompt_column=self.prompt_column, model_dir=self.model_dir, engine=self.engine,
                    settings=asdict(self.settings), batch_size=self.batch_size, part_rows=self.part_rows)


def check_file_job(job: FileJob) -> str:
    """What to do, decided before the model loads: "done" (OUTPUT holds this job's answers already), "resume"
    (OUTPUT.parts holds some of them) or "new". A UserError where the files belong to something else."""
    footer = read_footer(job.input, columns=(job.prompt_column,), require_usable=False)
    flag = f"--file={job.input}"
    if os.path.abspath(job.input) == os.path.abspath(job.output):
        raise UserError(f"--output={job.output}: the same file as --file; give another path")
    if ANSWER_COLUMN in pq.read_schema(job.input).names:
        raise UserError(f"{flag}: already has a column '{ANSWER_COLUMN}', which the output adds; rename it first")
    if footer.num_rows == 0:
        raise UserError(f"{flag}: no rows to answer")
    how = ("run the same command again to confirm it is complete, or delete it (or give another --output) to "
           "answer again")
    if os.path.exists(job.output):
        try:
            recorded = (pq.read_schema(job.output).metadata or {}).get(METADATA_KEY)
        except (pa.ArrowException, OSError):
            recorded = None
        if recorded is None:
            raise UserError(f"--output={job.output}: exists and was not written by generate --file; delete it or "
                            "give another --output")
        if json.loads(recorded)["identity"] != job.identity():
            raise UserError(f"--output={job.output}: holds answers made with other flags, model or input "
                            f"(recorded in its parquet metadata under {METADATA_KEY.decode()}); {how}")
        return "done"
    if os.path.isdir(job.parts_dir):
        recorded = read_job_record(job)
        if recorded is None or recorded["identity"] != job.identity():
            raise UserError(f"--output={job.output}: {job.parts_dir} holds the parts of an interrupted run with "
                            f"other flags, model or input (see {os.path.join(job.parts_dir, JOB_FILE)}); re-run "
                            "that command to finish it, or delete the directory to start over")
        return "resume"
    return "new"


def read_job_record(job: FileJob) -> dict | None:
    try:
        with open(os.path.join(job.parts_dir, JOB_FILE), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def part_path(job: FileJob, index: int) -> str:
    return os.path.join(job.parts_dir, f"part-{index:06d}.parquet")


def finished_parts(job: FileJob) -> int:
    """Parts written in order from the first (a run writes them in order; a gap means nothing after it counts)."""
    count = 0
    while os.path.isfile(part_path(job, count)):
        count += 1
    return count


def windows(job: FileJob, first_row: int):
    """The input's rows from `first_row` on, as tables of `part_rows` rows (the last one shorter)."""
    parquet = open_parquet(job.input)
    starts, row_group, skip = 0, 0, first_row
    while row_group < parquet.metadata.num_row_groups and starts + parquet.metadata.row_group(row_group).num_rows <= skip:
        starts += parquet.metadata.row_group(row_group).num_rows
        row_group += 1
    skip -= starts
    pending, pending_rows = [], 0
    try:
        for batch in parquet.iter_batches(batch_size=READ_ROWS, row_groups=range(row_group,
                                                                                  parquet.metadata.num_row_groups)):
            if skip:
                cut = min(skip, batch.num_rows)
                batch, skip = batch.slice(cut), skip - cut
            pending.append(batch)
            pending_rows += batch.num_rows
            while pending_rows >= job.part_rows:
                table = pa.Table.from_batches(pending)
                yield table.slice(0, job.part_rows)
                rest = table.slice(job.part_rows)
                pending, pending_rows = rest.to_batches(), rest.num_rows
    except (pa.ArrowException, OSError) as error:
        raise UnreadableData(f"--file={job.input}: cannot read ({error})") from None
    if pending_rows:
        yield pa.Table.from_batches(pending)


def answer_window(engine, table: pa.Table, job: FileJob, base_seed: int, part_index: int) -> list:
    """The answers to a window's prompts, in its row order: batches of similar token length (sorted), each with
    a seed of its own derived from the run's, so a resumed run samples exactly what an uninterrupted one would."""
    prompts = table.column(job.prompt_column).to_pylist()
    rows = [index for index, prompt in enumerate(prompts) if prompt is not None]
    lengths = engine.tokenizer([prompts[index] for index in rows])["input_ids"] if rows else []
    order = [rows[position] for position in sorted(range(len(rows)), key=lambda p: len(lengths[p]))]
    answers = [None] * len(prompts)  # a null prompt has a null answer
    for start in range(0, len(order), job.batch_size):
        batch = order[start:start + job.batch_size]
        seed = (base_seed + part_index * job.part_rows + start) % 2**32
        ids = engine.answer_ids([prompts[index] for index in batch], replace(job.settings, seed=seed))
        for index, text in zip(batch, engine.tokenizer.batch_decode(ids, skip_special_tokens=True)):
            answers[index] = text
    return answers


def write_parquet_atomically(table_or_parts, path: str, schema: pa.Schema) -> None:
    tmp = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{os.path.basename(path)}-{os.getpid()}")
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for table in table_or_parts:
                writer.write_table(table.replace_schema_metadata(schema.metadata))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(os.path.dirname(path))


def run_file_job(job: FileJob, engine, state: str, progress: bool = True) -> int:
    """Answer every row not answered yet and assemble OUTPUT; returns the number of rows answered by this call."""
    from tqdm import tqdm

    if state == "done":
        return 0
    os.makedirs(job.parts_dir, exist_ok=True)
    record = read_job_record(job) if state == "resume" else None
    if record is None:
        record = dict(identity=job.identity(), base_seed=resolved_seed(job.settings))
        write_json_atomically(os.path.join(job.parts_dir, JOB_FILE), record)
    total = int(pq.ParquetFile(job.input).metadata.num_rows)
    done_parts = finished_parts(job)
    first_row = min(total, done_parts * job.part_rows)
    schema = pq.read_schema(job.input).remove_metadata().append(pa.field(ANSWER_COLUMN, pa.string()))
    with tqdm(total=total, initial=first_row, unit="row", desc="answering", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        for index, table in enumerate(windows(job, first_row), start=done_parts):
            answers = answer_window(engine, table, job, record["base_seed"], index)
            table = table.append_column(pa.field(ANSWER_COLUMN, pa.string()), pa.array(answers, pa.string()))
            write_parquet_atomically([table.cast(schema)], part_path(job, index), schema)
            bar.update(table.num_rows)
    assemble(job, record, schema)
    return total - first_row


def assemble(job: FileJob, record: dict, schema: pa.Schema) -> None:
    """Join the parts into OUTPUT (one part in memory at a time), marked with the job's record, then drop them."""
    parts = [part_path(job, index) for index in range(finished_parts(job))]
    marked = schema.with_metadata({METADATA_KEY: json.dumps(record, ensure_ascii=False).encode()})
    write_parquet_atomically((pq.read_table(path) for path in parts), job.output, marked)
    shutil.rmtree(job.parts_dir)
