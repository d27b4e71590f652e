"""lm-evaluation-harness, driven: which tasks, loaded how, and one model's scores and per-item records.

Everything benchmark-specific is lm_eval's own: its tasks and metrics, its `hf`/`vllm` model classes
(built from the same argument string its CLI builds), `simple_evaluate` with the same settings for every
model. What is added: the checks that make a bad task a one-line error before any model is loaded, an
index of lm_eval's ~15,000 built-in task files only when a task is not in --include-path, and offline
data found (or refused) at once instead of after a minute of retries.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import ShadowMergeError, first_line

INSTALL = "pip install 'shadowmerge[eval]'"
_NOT_METRICS = ("alias", "name", "sample_len")


def lm_eval():
    """The lm_eval package, or a one-line error that says how to install it."""
    try:
        import lm_eval as module
        from lm_eval.tasks import TaskManager  # noqa: F401 - the API this module needs
    except ImportError as exc:
        raise ShadowMergeError(f"shadowmerge eval needs lm-evaluation-harness for --tasks (missing: "
                               f"{exc.name or exc}); install it: {INSTALL}") from None
    return module


@contextlib.contextmanager
def quiet_libraries(quiet: bool):
    """For the time of a run: lm_eval's per-task notices ("metric acc is defined, but aggregation is not") are
    dropped, and with quiet (--quiet, or stderr a log file) every library's tqdm bar is off (progress.library_bars)."""
    from ..progress import library_bars

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with library_bars(quiet):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_yaml(folder: Path) -> None:
    """Every task YAML under an include folder parses (lm_eval would skip a broken one silently, and the
    task would then be 'unknown')."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for path in sorted(folder.glob("**/*.yaml")):
        try:
            load_yaml(path, resolve_func=False)
        except Exception as exc:       # noqa: BLE001 - yaml's and lm_eval's errors alike: the file is bad
            raise ShadowMergeError(f"task file {path} does not parse ({first_line(exc, 160)}); fix the YAML or move "
                                   f"it out of --include-path") from None


@dataclass
class Tasks:
    names: list[str]
    manager: object                 # lm_eval's TaskManager
    builtin: list[str]              # names that are lm_eval's own (their data may come from the Hub)
    include_path: list[str]
    offline: bool = False           # the Hub is out of reach: datasets reads its cache only


@contextlib.contextmanager
def data_mode(tasks: Tasks):
    """While tasks load their data: offline (cache only) when the Hub was out of reach; the process's own
    settings are restored afterwards."""
    if not tasks.offline:
        yield
        return
    import datasets
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def resolve(names: list[str], include_path: list[str]) -> Tasks:
    """The tasks, found in --include-path first and among lm_eval's built-in tasks only where needed."""
    lm_eval()
    from lm_eval.tasks import TaskManager

    folders = []
    for p in include_path:
        folder = Path(p).expanduser()
        if not folder.is_dir():
            raise ShadowMergeError(f"--include-path {p} is not a folder; pass the folder that holds your task YAMLs")
        _check_yaml(folder)
        folders.append(str(folder.resolve()))
    with quiet_libraries(False):
        tm = TaskManager(include_path=folders, include_defaults=False) if folders else None
        local = set(tm.all_tasks) if tm is not None else set()
        builtin = [n for n in names if n not in local]
        if builtin:
            tm = TaskManager(include_path=folders or None)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, tm.all_tasks, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        where = f" nor in --include-path {', '.join(include_path)}" if include_path else ""
        raise ShadowMergeError(f"task {name!r} is not one of lm_eval's tasks{where}; {hint}list them with "
                               f"`lm_eval ls tasks`, or write a task YAML and pass its folder with --include-path")
    return Tasks(names, tm, builtin, folders)


def _hub_reachable() -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
        return True
    except OSError:
        return False


def load(tasks: Tasks) -> None:
    """Load every task once, with its data, before any model: a task whose data cannot be had is an error now.
    With the Hub out of reach, datasets reads its cache only (an error at once, not after retries)."""
    tasks.offline = bool(tasks.builtin) and not _hub_reachable()
    try:
        with quiet_libraries(True), data_mode(tasks):
            tasks.manager.load(list(tasks.names))
    except ShadowMergeError:
        raise
    except ConnectionError as exc:
        raise ShadowMergeError(f"the data of task(s) {', '.join(tasks.builtin) or ', '.join(tasks.names)} is not "
                               f"available offline ({first_line(exc)}); run once with the Hub in reach so that "
                               f"the dataset lands in the Hugging Face cache, or write a local task YAML "
                               f"(dataset_path: json) and pass --include-path") from None
    except Exception as exc:          # noqa: BLE001 - a task file of the user's that lm_eval cannot build
        raise ShadowMergeError(f"lm_eval cannot load task(s) {', '.join(tasks.names)}: {type(exc).__name__}: "
                               f"{first_line(exc)}; fix the task YAML or its data file") from None


def check_backend(backend: str) -> None:
    """The engine --backend names is installed (lm_eval imports it only when a model is built)."""
    import importlib.util

    lm_eval()
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ShadowMergeError("--backend vllm needs vLLM, which is not installed here; install it (pip install "
                               "vllm, on a machine with a GPU), or use --backend hf")


def model_args(folder: Path, settings) -> str:
    """The model argument string lm_eval's CLI would get: pretrained=FOLDER, the dtype, and --model-args."""
    args = [f"pretrained={folder}", f"dtype={settings.dtype}"]
    if settings.model_args:
        args.append(settings.model_args)
    return ",".join(args)


def build_model(folder: Path, settings):
    """lm_eval's own model class for the backend, built exactly as simple_evaluate builds it from a name."""
    from lm_eval.api.registry import get_model

    try:
        cls = get_model(settings.backend)
    except Exception as exc:          # noqa: BLE001
        raise ShadowMergeError(f"--backend {settings.backend}: lm_eval does not offer it ({first_line(exc)}); use "
                               f"hf, or install vllm for --backend vllm") from None
    extra = {"batch_size": settings.batch_size, "max_batch_size": None, "device": settings.device}
    from ..formats.fp8 import load_kwargs

    decode = load_kwargs(folder, "model") if settings.backend == "hf" else {}
    if decode:        # FP8 blocks: loaded decoded here (the argument string cannot carry the config), then handed over
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = torch.bfloat16 if settings.dtype == "auto" else getattr(torch, settings.dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **decode).to(settings.device).eval()
        return cls(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(folder), **extra)
    try:
        return cls.create_from_arg_string(model_args(folder, settings), extra)
    except ImportError as exc:
        raise ShadowMergeError(f"--backend {settings.backend} needs {exc.name or 'a package that is missing'}: "
                               f"pip install {exc.name or settings.backend}") from None


def evaluate(lm, tasks: Tasks, settings) -> dict:
    """lm_eval's results for one model (scores, per-item samples), with the run's settings."""
    from lm_eval import evaluator

    seeds = {} if settings.seed is None else {k: settings.seed for k in (
        "random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")}
    # lm_eval asks git for its own commit, which prints "fatal: not a git repository" outside a checkout
    git_hash, evaluator.get_git_commit_hash = evaluator.get_git_commit_hash, lambda: None
    try:
        with data_mode(tasks):
            res = evaluator.simple_evaluate(model=lm, tasks=list(tasks.names), task_manager=tasks.manager,
                                            num_fewshot=settings.num_fewshot, limit=settings.limit,
                                            apply_chat_template=settings.apply_chat_template, log_samples=True,
                                            **seeds)
    finally:
        evaluator.get_git_commit_hash = git_hash
    if res is None:
        raise ShadowMergeError("lm_eval returned no results (a non-main process of a distributed run); run "
                               "shadowmerge eval in one process, or use --backend vllm for several GPUs")
    return res


def scores(label: str, res: dict) -> list[dict]:
    """One row per (task, metric, filter) that lm_eval reports, its value exactly as lm_eval gives it."""
    rows = []
    for task, values in res["results"].items():
        n = (res.get("n-samples") or {}).get(task, {}).get("effective")
        for key, value in values.items():
            if key in _NOT_METRICS or "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = values.get(f"{metric}_stderr,{filt}")
            rows.append({"model": label, "task": task, "metric": metric, "filter": filt, "value": value,
                         "stderr": stderr if isinstance(stderr, (int, float)) else None, "n": n,
                         "higher_is_better": (res.get("higher_is_better") or {}).get(task, {}).get(metric, True)})
    return rows


def item_values(res: dict) -> dict[tuple[str, str, str], dict[str, float]]:
    """{(task, metric, filter): {doc_id: value}} for every per-item value that is a number."""
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for task, samples in (res.get("samples") or {}).items():
        for s in samples:
            for metric in s.get("metrics") or ():
                v = s.get(metric)
                if isinstance(v, bool) or isinstance(v, (int, float)):
                    out.setdefault((task, metric, s.get("filter", "none")), {})[str(s["doc_id"])] = float(v)
    return out
