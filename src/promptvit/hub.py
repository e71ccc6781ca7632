"""The Hugging Face Hub: addresses ``hf-hub:ORG/NAME[@revision]``, downloads, model cards and uploads.

A Hub repository holds an artifact folder (``adapter_config.json``, ``adapter_model.safetensors``), a model
card (``README.md``: method, base model, data, test metrics with their intervals, licence, ``model-index``,
the recipe when the artifact comes from a run folder) and, for a method peft can express (LoRA), the same
model as a peft adapter in ``peft/``. No uploaded file names a path of the machine that wrote it.

Everything goes through ``huggingface_hub`` (its token, cache and offline mode: ``HF_TOKEN``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``). Where the Hub cannot be reached, downloads work from the cache at once
instead of retrying for about a minute; network, access and address problems are one-line ``HubError``s.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from promptvit.artifact_format import CONFIG_FILE, WEIGHTS_FILE, read_artifact_config
from promptvit.errors import ArtifactError, HubError

HUB_PREFIX = "hf-hub:"
CARD_FILE = "README.md"
PEFT_FOLDER = "peft"
REACH_TIMEOUT_S = 3.0


def is_hub_id(source: object) -> bool:
    return isinstance(source, str) and source.startswith(HUB_PREFIX)


def local_folder(source: str | Path) -> Path:
    """The local folder of an address: ``hf-hub:ORG/NAME[@revision]`` is downloaded (or found in the cache)."""
    return download(str(source)) if is_hub_id(str(source)) else Path(source)


def repo_id_of(repo: str) -> str:
    """``ORG/NAME`` from ``ORG/NAME`` or ``hf-hub:ORG/NAME``; ``HubError`` for anything else."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id = repo.removeprefix(HUB_PREFIX)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        repo_id = ""
    if repo_id.count("/") != 1 or repo_id.startswith(".") or ".." in repo_id:
        raise HubError(
            f"'{repo}' is not a Hub repository id; write ORG/NAME (letters, digits, '-', '_', '.')"
        )
    return repo_id


def download(source: str, *, revision: str | None = None) -> Path:
    """The local folder of ``hf-hub:ORG/NAME[@revision]``: downloaded, or from the Hub cache when offline."""
    from huggingface_hub import snapshot_download

    repo_id, _, tag = source.removeprefix(HUB_PREFIX).partition("@")
    repo_id = repo_id_of(repo_id)
    with offline_unless_reachable(), hub_errors(f"download {source}"):
        folder = snapshot_download(
            repo_id,
            revision=revision or tag or None,
            allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, CARD_FILE],
        )
    return Path(folder)


def hub_reachable(timeout: float = REACH_TIMEOUT_S) -> bool:
    """Whether a connection to the Hub endpoint (or the HTTPS proxy) opens within ``timeout`` seconds."""
    from huggingface_hub import constants

    proxy = next(
        (
            os.environ[k]
            for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
            if os.environ.get(k)
        ),
        None,
    )
    url = urlsplit(proxy or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[None]:
    """Within the block huggingface_hub answers from its cache alone when the Hub cannot be reached (or
    ``HF_HUB_OFFLINE`` is set): a file that is not cached fails at once, not after a minute of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or hub_reachable():
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


@contextlib.contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Hub, network and access failures inside the block become one-line ``HubError``s saying what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    login = "log in with `hf auth login` or set HF_TOKEN"
    try:
        yield
    except LocalEntryNotFoundError as error:
        raise HubError(
            f"cannot {what}: it is not in the Hub cache and the Hub cannot be reached (offline?); connect once "
            "or unset HF_HUB_OFFLINE"
        ) from error
    except OfflineModeIsEnabled as error:
        raise HubError(f"cannot {what}: offline mode is on (HF_HUB_OFFLINE); unset it") from error
    except RevisionNotFoundError as error:
        raise HubError(f"cannot {what}: the Hub has no such revision (branch, tag or commit)") from error
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise HubError(
            f"cannot {what}: the repository does not exist or you may not access it (private or gated: {login})"
        ) from error
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        hint = f"; {login} with a token that may do this" if status in (401, 403) else ""
        raise HubError(f"cannot {what}: the Hub answered {_first_line(error)}{hint}") from error
    except HFValidationError as error:
        raise HubError(f"cannot {what}: {_first_line(error)}") from error
    except Exception as error:
        if not (isinstance(error, OSError) or _is_network_error(error)):
            raise
        raise HubError(
            f"cannot {what}: the Hugging Face Hub ({_endpoint()}) cannot be reached ({_first_line(error)}); "
            "check the connection or the proxy, or work from the cache with HF_HUB_OFFLINE=1"
        ) from error


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _is_network_error(error: BaseException) -> bool:
    return type(error).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ------------------------------------------------------------------------------------ no local paths


def local_paths(run_dir: Path | None, config: dict[str, Any] | None = None) -> list[str]:
    """Absolute paths of this machine that files written for others must not contain, longest first."""
    paths = {str(Path.home()), str(Path.cwd()), tempfile.gettempdir()}
    if run_dir is not None:
        paths |= {str(run_dir.resolve()), str(run_dir.resolve().parent)}
    for value in _strings(config or {}):
        if os.path.isabs(value):
            paths |= {value, str(Path(value).parent)}
    return sorted((p for p in paths if len(p) > 1), key=len, reverse=True)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def without_local_paths(value: Any, paths: list[str] | None = None) -> Any:
    """``value`` (a config, or text) with every absolute path replaced by its last part (a file or folder
    name); in text, the ``paths`` given (see :func:`local_paths`) are replaced the same way."""
    if isinstance(value, dict):
        return {k: without_local_paths(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [without_local_paths(v, paths) for v in value]
    if not isinstance(value, str):
        return value
    if os.path.isabs(value) and "\n" not in value and len(Path(value).parts) > 1:
        return Path(value).name
    for path in paths or []:
        value = value.replace(path + os.sep, "").replace(path, Path(path).name)
    return value


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """An artifact config fit to share: a local backbone weights file is named by its file name (``load``
    looks for it beside the artifact), and no other entry holds a path of this machine."""
    return {k: v if k == "class_names" else without_local_paths(copy.deepcopy(v)) for k, v in config.items()}


# ------------------------------------------------------------------------------------ model cards


def _run_file(run_dir: Path | None, name: str) -> str | None:
    if run_dir is None or not (run_dir / name).is_file():
        return None
    return (run_dir / name).read_text(encoding="utf-8").strip()


def _run_metrics(run_dir: Path | None) -> dict[str, Any] | None:
    text = _run_file(run_dir, "metrics.json")
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _base_description(base: dict[str, Any]) -> str:
    origin = base.get("origin") or (
        "file" if base.get("weights") else "hub" if base.get("pretrained") else "random"
    )
    if origin == "hub":
        return "pretrained weights from the Hugging Face Hub"
    if origin == "file":
        return f"weights from a local file `{Path(base['weights']).name}` (not uploaded)"
    if origin == "random":
        return f"randomly initialised, seed {base.get('init_seed', 0)}"
    return "weights of unknown origin"


def _base_code(base: dict[str, Any], num_classes: int) -> list[str]:
    """Python lines that build the base model (``base = ...``) the way the record says it was built."""
    name = base.get("name") or "NAME"
    options = {
        k: v
        for k, v in (base.get("kwargs") or {}).items()
        if k not in ("num_classes", "pretrained_cfg_overlay")
    }
    arguments = "".join(f", {k}={v!r}" for k, v in options.items())
    origin = base.get("origin") or (
        "file" if base.get("weights") else "hub" if base.get("pretrained") else "random"
    )
    if origin == "file":
        file = Path(base["weights"]).name
        return [
            "import timm",
            f"base = timm.create_model({name.split('.')[0]!r}, pretrained=True, num_classes={num_classes}, "
            f"pretrained_cfg_overlay=dict(file={file!r}, custom_load=False){arguments})  # the base weights file",
        ]
    if origin == "random":
        return [
            "import promptvit  # the random base is rebuilt from its seed",
            f"base = promptvit.create_backbone({name!r}, init_seed={base.get('init_seed') or 0}, "
            f"num_classes={num_classes}{arguments})",
        ]
    pretrained = "True" if origin == "hub" else "True  # the weights it was trained on"
    return [
        "import timm",
        f"base = timm.create_model({name!r}, pretrained={pretrained}, num_classes={num_classes}{arguments})",
    ]


def _licence(license: str | None, base: dict[str, Any]) -> tuple[str, str]:
    """The card's ``license`` metadata and the sentence about it."""
    if license:
        return license, f"Released under `{license}`."
    known = (
        f" The base model's weights are released under `{base['license']}`." if base.get("license") else ""
    )
    return "unknown", f"No licence was given for this model.{known}"


def _metric_rows(metrics: dict[str, Any]) -> tuple[list[str], list[tuple[str, float]]]:
    """Markdown rows of the test metrics (raw and calibrated, the main metric with its CI) and the
    (metric, value) pairs of the model-index."""
    test = metrics.get("test") or {}
    calibrated = test.get("calibrated") or {}
    ci = test.get("ci") or {}
    rows, results = [], []
    for key, value in test.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or key in ("num_samples", "loss"):
            continue
        raw = f"{value:.4g}"
        if ci.get("metric") == key and isinstance(ci.get("low"), (int, float)):
            raw += f" [{ci['low']:.4g}, {ci['high']:.4g}]"
        again = calibrated.get(key)
        rows.append(f"| {key} | {raw} | {f'{again:.4g}' if isinstance(again, (int, float)) else ''} |")
        results.append((key, float(value)))
    return rows, results


def model_card(
    info: dict[str, Any],
    run_dir: Path | None = None,
    *,
    repo_id: str | None = None,
    license: str | None = None,
    peft_subfolder: bool = False,
) -> str:
    """The Hub model card (``huggingface_hub.ModelCard``: YAML metadata, then Markdown) of an artifact, with
    its run folder's data summary, test metrics and recipe when given; no path of this machine in it."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    base = info.get("base_model") or {}
    name = base.get("name") or "unknown"
    method = info["method"]
    repo = repo_id or "ORG/NAME"
    run_config = yaml.safe_load(_run_file(run_dir, "config.yaml") or "{}") or {}
    paths = local_paths(run_dir, run_config)
    metrics = _run_metrics(run_dir)
    rows, results = _metric_rows(metrics) if metrics else ([], [])
    data = run_config.get("data") or {}
    dataset = str(data.get("dataset") or Path(str(data.get("path") or "local data")).name)
    license_id, license_text = _licence(license, base)
    card_data = ModelCardData(
        library_name="promptvit",
        license=license_id,
        base_model=base.get("hub_id") if base.get("hub_id") else None,
        tags=["promptvit", "image-classification", "timm", method]
        + (["peft", "lora"] if peft_subfolder else []),
        pipeline_tag="image-classification",
        model_name=repo.split("/")[-1],
        eval_results=[
            EvalResult(
                task_type="image-classification",
                dataset_type=str(data.get("kind") or "imagefolder"),
                dataset_name=dataset,
                dataset_split="test",
                metric_type=metric,
                metric_value=value,
            )
            for metric, value in results
        ]
        or None,
    )
    params = info.get("parameters") or {}
    size = (
        f" It holds only the tuned tensors: {params['tuned']:,} of {params['total']:,} parameters."
        if params
        else ""
    )
    lines = [
        f"# {method} on {name}",
        "",
        f"A promptvit artifact: method **{method}** on the timm backbone `{name}` "
        f"({_base_description(base)}).{size}",
        "",
        "```python",
        "import promptvit",
        f'model = promptvit.load("hf-hub:{repo}")  # rebuilds the timm backbone, then loads the tuned tensors',
        "```",
        "",
        f"From the command line: `promptvit predict hf-hub:{repo} IMAGES... --out predictions.csv`.",
    ]
    if base.get("origin") == "file":
        lines += [
            "",
            f"The backbone weights are not in this repository: put `{Path(base['weights']).name}` "
            "next to the downloaded artifact (or pass `base_model=`).",
        ]
    if peft_subfolder:
        lines += [
            "",
            "The same model as a Hugging Face peft adapter, on the same timm base:",
            "",
            "```python",
            "from peft import PeftModel",
            *_base_code(base, info["num_classes"]),
            f'model = PeftModel.from_pretrained(base, "{repo}", subfolder="{PEFT_FOLDER}")',
            "```",
        ]
    lines += [
        "",
        "## Method",
        "",
        "```json",
        json.dumps(info.get("method_config", {}), indent=2),
        "```",
        "",
        "## Data",
        "",
        f"Classes ({len(info.get('class_names', []))}): {', '.join(map(str, info.get('class_names', [])))}; "
        f"{'multi-label' if info.get('multilabel') else 'single-label'}; input size {info.get('input_size')} "
        f"(preprocessing: `{json.dumps(info.get('data_config', {}))}`).",
    ]
    summary = _run_file(run_dir, "data.txt")
    if summary:
        lines += ["", "```", without_local_paths(summary, paths), "```"]
    lines += ["", "## Test metrics", ""]
    if rows:
        ci = (metrics.get("test") or {}).get("ci") or {}
        level = ci.get("level")
        lines += [
            "| metric | raw | calibrated |",
            "| --- | ---: | ---: |",
            *rows,
            "",
            f"In brackets: the bootstrap {f'{100 * level:g} % ' if isinstance(level, (int, float)) else ''}"
            f"confidence interval of the main metric ({ci.get('metric', '')}); calibrated: with the temperature "
            "(or Platt scaling) fitted on validation, stored in the artifact.",
            "",
            f"Selection: {metrics.get('selection', info.get('selection', ''))}.",
        ]
        if metrics.get("backbone_init") == "random":
            lines += ["", "**Warning**: trained on a randomly initialised backbone."]
    else:
        lines.append(f"Not recorded with the artifact. Selection: {info.get('selection', 'unknown')}.")
    lines += ["", "## Licence", "", license_text]
    recipe = _run_file(run_dir, "config.yaml")
    if recipe:
        portable = yaml.safe_dump(without_local_paths(run_config, paths), sort_keys=False).strip()
        lines += [
            "",
            "## Recipe",
            "",
            "Reproduce with `promptvit train --config config.yaml` (the run's configuration; local paths are "
            "shortened to their last part):",
            "",
            "```yaml",
            portable,
            "```",
        ]
    body = "\n".join(lines) + "\n"
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}"))


def peft_card(info: dict[str, Any], *, repo_id: str | None = None, subfolder: str | None = None) -> str:
    """README of a peft export: what it is, how peft loads it, the classes and preprocessing."""
    from huggingface_hub import ModelCard, ModelCardData

    base = info.get("base_model") or {}
    name = base.get("name") or "NAME"
    where = (
        f'"{repo_id}", subfolder="{subfolder}"'
        if repo_id and subfolder
        else f'"{repo_id}"'
        if repo_id
        else '"PATH"'
    )
    card_data = ModelCardData(
        library_name="peft",
        base_model=base.get("hub_id") or None,
        tags=["lora", "image-classification", "timm", "promptvit"],
        pipeline_tag="image-classification",
    )
    body = "\n".join(
        [
            f"# LoRA adapter for {name}",
            "",
            f"Exported by promptvit from a `{info['method']}` artifact: one peft LoRA per fused `qkv` (the parts "
            "promptvit does not adapt have zero rows in B) and the classifier as `modules_to_save`.",
            "",
            "```python",
            "from peft import PeftModel",
            *_base_code(base, info["num_classes"]),
            f"model = PeftModel.from_pretrained(base, {where}).eval()",
            "```",
            "",
            f"Classes ({info['num_classes']}): {', '.join(map(str, info.get('class_names', [])))}; "
            f"{'multi-label (sigmoid)' if info.get('multilabel') else 'single-label (softmax)'}.",
            "",
            f"Preprocessing (timm data config): `{json.dumps(info.get('data_config', {}))}`.",
            "",
        ]
    )
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}"))


# ------------------------------------------------------------------------------------ upload


def _artifact_and_run(path: Path) -> tuple[Path, Path | None]:
    if (path / "artifact" / CONFIG_FILE).is_file():
        return path / "artifact", path
    if (path / CONFIG_FILE).is_file():
        parent = path.parent
        return path, parent if (parent / "metrics.json").is_file() else None
    raise ArtifactError(f"{path} is neither an artifact folder nor a run folder with artifact/ inside")


def push_to_hub(
    source: Any,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload promptvit artifact",
    license: str | None = None,
    peft_model: Any = None,
    **extra: Any,
) -> str:
    """Upload a PromptModel, an artifact folder or a run folder (artifact + card) to ``repo_id``.

    ``extra`` entries go into the artifact's config when ``source`` is a model (class_names, ...). Where the
    model (``source``, or ``peft_model`` for a folder) can be written as a peft adapter, it goes into ``peft/``.
    ``license``: the card's licence (default ``unknown``, naming the base weights' licence when known).
    Returns the URL of the commit.
    """
    from huggingface_hub import HfApi

    repo_id = repo_id_of(repo_id)
    with tempfile.TemporaryDirectory(prefix="promptvit-hub-") as staging:
        folder = Path(staging)
        if hasattr(source, "save_pretrained"):  # a PromptModel (not imported: the model layer is above)
            source.save_pretrained(folder, **extra)
            peft_model, run_dir = source, None
            info = read_artifact_config(folder)
        else:
            artifact, run_dir = _artifact_and_run(Path(source))
            info = read_artifact_config(artifact)
            (folder / WEIGHTS_FILE).write_bytes((artifact / WEIGHTS_FILE).read_bytes())
        portable = portable_config(info)
        (folder / CONFIG_FILE).write_text(
            json.dumps(portable, indent=2, default=list) + "\n", encoding="utf-8"
        )
        with_peft = peft_model is not None and peft_model.method.has_peft_form()
        if with_peft:
            peft_model.save_peft_adapter(folder / PEFT_FOLDER)
            card = peft_card(portable, repo_id=repo_id, subfolder=PEFT_FOLDER)
            (folder / PEFT_FOLDER / CARD_FILE).write_text(card, encoding="utf-8")
            _without_local_paths_in_json(folder / PEFT_FOLDER / "adapter_config.json")
        card = model_card(portable, run_dir, repo_id=repo_id, license=license, peft_subfolder=with_peft)
        (folder / CARD_FILE).write_text(card, encoding="utf-8")
        if not hub_reachable():
            raise HubError(
                f"cannot push to {repo_id}: the Hugging Face Hub ({_endpoint()}) cannot be reached; check the "
                "connection or the proxy (HTTPS_PROXY)"
            )
        api = HfApi(token=token)
        with hub_errors(f"push to {repo_id}"):
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id, repo_type="model", folder_path=str(folder), commit_message=commit_message
            )
    return str(getattr(commit, "commit_url", commit))


def _without_local_paths_in_json(path: Path) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(without_local_paths(data), indent=2) + "\n", encoding="utf-8")
