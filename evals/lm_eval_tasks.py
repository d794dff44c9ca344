"""Write patchattn's synthetic tasks and a local-text perplexity task as lm-eval task files.

    write_tasks("tasks/", tokenizer, tasks=["passkey", "niah_single"], lengths=[4096], samples=20)
    patchattn lm-eval --model patchattn --model_args pretrained=M --include_path tasks/ \\
        --tasks patchattn_passkey_4k,patchattn_niah_single_4k

Each task is a small YAML that includes a shared template (``evals/tasks/``, copied next to it)
plus a JSONL file of samples generated for the model's tokenizer, because prompt lengths are
counted in that tokenizer's tokens. Tags: ``patchattn_ruler`` (all synthetic tasks),
``patchattn_ruler_4k`` (one length), ``patchattn_ppl`` (perplexity tasks).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Sequence

import yaml

from . import synthetic

TEMPLATES = Path(__file__).parent / "tasks"
SYNTHETIC_TEMPLATE = "_patchattn_synthetic.yaml"
PPL_TEMPLATE = "_patchattn_ppl.yaml"

__all__ = ["length_label", "process_results", "write_tasks", "write_tasks_main", "ppl_chunks"]


def length_label(n: int) -> str:
    """4096 -> '4k', 1000 -> '1000': the length part of a task name."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def process_results(doc: Mapping, results: Sequence[str]) -> dict:
    """lm-eval hook: score the (until-truncated) completion with the synthetic task's scorer."""
    return {"score": synthetic.score(doc["task"], doc, results[0])}


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_task_yaml(out: Path, name: str, template: str, data: Path, tags: List[str],
                     generation_kwargs: Optional[dict] = None) -> None:
    cfg = {
        "include": template,
        "task": name,
        "tag": tags,
        # datasets resolves relative data files against the working directory, not the YAML.
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
    }
    if generation_kwargs:
        cfg["generation_kwargs"] = generation_kwargs
    (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")


def _write_synthetic(out: Path, tokenizer, task: str, length: int, samples: int, seed: int,
                     haystack) -> str:
    name = f"patchattn_{task}_{length_label(length)}"
    rows = synthetic.generate_samples(task, tokenizer, length, samples, seed=seed, haystack=haystack)
    _write_jsonl(out / f"{name}.jsonl", (s.to_dict() for s in rows))
    spec = synthetic.TASKS[task]
    gen = {"do_sample": False, "max_gen_toks": spec.max_new_tokens, "until": list(spec.stop)}
    _write_task_yaml(out, name, SYNTHETIC_TEMPLATE, out / f"{name}.jsonl",
                     ["patchattn_ruler", f"patchattn_ruler_{length_label(length)}"], gen)
    return name


def ppl_chunks(tokenizer, text: str, length: int, n_docs: int) -> List[str]:
    """Up to n_docs consecutive chunks of `text`, each `length` tokens with the BOS the model adds."""
    per_doc = max(length - 1, 1)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    starts = [span[0] for span in enc["offset_mapping"]]  # cut on token boundaries, in characters
    chunks = []
    for i in range(0, len(starts) - per_doc + 1, per_doc):
        if len(chunks) == n_docs:
            break
        end = starts[i + per_doc] if i + per_doc < len(starts) else len(text)
        chunks.append(text[starts[i]:end])
    return chunks


def _write_ppl(out: Path, tokenizer, text_path: Path, length: int, n_docs: int) -> Optional[str]:
    name = f"patchattn_ppl_{length_label(length)}"
    chunks = ppl_chunks(tokenizer, text_path.read_text(encoding="utf-8", errors="replace"), length, n_docs)
    if not chunks:
        return None
    _write_jsonl(out / f"{name}.jsonl", ({"text": c, "source": text_path.name} for c in chunks))
    _write_task_yaml(out, name, PPL_TEMPLATE, out / f"{name}.jsonl", ["patchattn_ppl"])
    return name


def write_tasks(out_dir, tokenizer, tasks: Sequence[str] = synthetic.DEFAULT_TASKS,
                lengths: Sequence[int] = (4096,), samples: int = 20, seed: int = 0, haystack=None,
                ppl_text=None, ppl_docs: int = 4) -> List[str]:
    """Write task YAMLs + JSONL data into `out_dir` (use as lm-eval --include_path); return task names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for template in (SYNTHETIC_TEMPLATE, PPL_TEMPLATE):
        shutil.copyfile(TEMPLATES / template, out / template)
    names = [_write_synthetic(out, tokenizer, t, n, samples, seed, haystack) for t in tasks for n in lengths]
    if ppl_text:
        names += [x for n in lengths if (x := _write_ppl(out, tokenizer, Path(ppl_text), n, ppl_docs))]
    return names


def load_tokenizer(spec: str):
    """The tokenizer of a model spec (folder, hub id, .gguf, alias) without loading weights."""
    from transformers import AutoTokenizer

    from patchattn import models

    source, gguf = models.resolve(spec)
    return AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf} if gguf else {}))


def _int_list(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x]


def write_tasks_main(argv: Optional[List[str]] = None) -> None:
    """CLI: write lm-eval task files for a model's tokenizer (``patchattn lm-eval-tasks``)."""
    p = argparse.ArgumentParser(prog="patchattn lm-eval-tasks", description=write_tasks_main.__doc__)
    p.add_argument("--model", required=True, help="model whose tokenizer sizes the prompts")
    p.add_argument("--out", required=True, help="directory to pass to lm-eval --include_path")
    p.add_argument("--tasks", default=",".join(synthetic.DEFAULT_TASKS),
                   help=f"comma list from: {', '.join(synthetic.TASKS)}")
    p.add_argument("--lengths", default="4096", type=_int_list, help="comma list of prompt lengths in tokens")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", default=None, help=".txt file or folder (default: generated filler)")
    p.add_argument("--ppl-text", default=None, help="local text file for patchattn_ppl_<len> tasks")
    p.add_argument("--ppl-docs", type=int, default=4, help="chunks per perplexity task")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    from .runner import EvalError, _model_config, check_lengths

    config = _model_config(args.model)
    try:
        if config is not None:
            # lm-eval would otherwise left-truncate longer prompts to the model's max_length.
            check_lengths(config, args.lengths)
        unknown = [t for t in tasks if t not in synthetic.TASKS]
        if unknown:
            raise EvalError(f"unknown task(s) {unknown}; choose from {', '.join(synthetic.TASKS)}")
    except EvalError as e:
        p.error(str(e))
    names = write_tasks(args.out, load_tokenizer(args.model), tasks, args.lengths, args.samples,
                        args.seed, args.haystack, args.ppl_text, args.ppl_docs)
    print(f"wrote {len(names)} tasks to {args.out}: {','.join(names)}")
