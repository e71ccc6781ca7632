"""Share artifacts on the Hugging Face Hub: ``push_to_hub`` and loading ``hf-hub:ORG/NAME``.

A Hub repository holds exactly an artifact folder (``adapter_config.json``, ``adapter_model.safetensors``)
plus a model card (``README.md``): the method, the base model, the data, the metrics and the recipe
(the run's ``config.yaml``) when the artifact comes from a run folder. Everything goes through
``huggingface_hub`` (its token, cache and offline mode: ``HF_TOKEN``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import yaml

from promptvit.artifact_format import CONFIG_FILE, WEIGHTS_FILE, read_artifact_config
from promptvit.errors import ArtifactError

HUB_PREFIX = "hf-hub:"
CARD_FILE = "README.md"


def is_hub_id(source: object) -> bool:
    return isinstance(source, str) and source.startswith(HUB_PREFIX)


def download(source: str, *, revision: str | None = None) -> Path:
    """The local folder of ``hf-hub:ORG/NAME[@revision]`` (from the Hub cache when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id = source.removeprefix(HUB_PREFIX)
    repo_id, _, tag = repo_id.partition("@")
    if repo_id.count("/") != 1:
        raise ArtifactError(f"'{source}' is not a Hub model id; write hf-hub:ORG/NAME")
    try:
        folder = snapshot_download(
            repo_id, revision=revision or tag or None, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, CARD_FILE]
        )
    except LocalEntryNotFoundError as error:
        raise ArtifactError(
            f"{source} is not in the Hub cache and the Hub cannot be reached (offline?); "
            "connect once or unset HF_HUB_OFFLINE"
        ) from error
    except (HfHubHTTPError, OSError) as error:
        raise ArtifactError(f"cannot download {source}: {str(error).splitlines()[0]}") from error
    return Path(folder)


def local_folder(path_or_hub_id: str | Path) -> Path:
    """The folder of an artifact given as a path or as a Hub address (``hf-hub:ORG/NAME``, downloaded)."""
    return download(path_or_hub_id) if is_hub_id(path_or_hub_id) else Path(path_or_hub_id)


def model_card(info: dict[str, Any], run_dir: Path | None = None) -> str:
    """Markdown with YAML front matter, from the artifact's config and, if given, its run folder."""
    base = info.get("base_model") or {}
    name = base.get("name") or "unknown"
    pretrained = "pretrained" if base.get("pretrained") else "randomly initialised"
    meta = {
        "library_name": "promptvit",
        "pipeline_tag": "image-classification",
        "tags": ["promptvit", "image-classification", "peft", info["method"]],
    }
    if base.get("pretrained") and not base.get("weights"):
        meta["base_model"] = f"timm/{name}"
    params = info.get("parameters") or {}
    weights = f", local weights `{Path(base['weights']).name}`" if base.get("weights") else ""
    size = f" It holds only the tuned tensors: {params['tuned']:,} of {params['total']:,} parameters." if params else ""
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {info['method']} on {name}",
        "",
        f"A promptvit artifact: method **{info['method']}** on the timm backbone `{name}` "
        f"({pretrained}{weights}).{size}",
        "",
        "```python",
        "import promptvit",
        "model = promptvit.load(\"hf-hub:ORG/NAME\")  # rebuilds the timm backbone, then loads the tuned tensors",
        "```",
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
        f"{'multi-label' if info.get('multilabel') else 'single-label'}; input size {info.get('input_size')}.",
    ]
    if run_dir is not None and (run_dir / "data.txt").is_file():
        lines += ["", "```", (run_dir / "data.txt").read_text(encoding="utf-8").strip(), "```"]
    metrics = _run_metrics(run_dir)
    lines += ["", "## Metrics", ""]
    if metrics:
        lines += ["| split | metric | value |", "| --- | --- | ---: |"]
        for split in ("val", "test"):
            for key, value in (metrics.get(split) or {}).items():
                if isinstance(value, float):
                    lines.append(f"| {split} | {key} | {value:.4g} |")
        lines += ["", f"Selection: {metrics.get('selection', info.get('selection', ''))}."]
        if metrics.get("backbone_init") == "random":
            lines += ["", "**Warning**: trained on a randomly initialised backbone."]
    else:
        lines.append(f"Not recorded with the artifact. Selection: {info.get('selection', 'unknown')}.")
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        lines += [
            "",
            "## Recipe",
            "",
            "Reproduce with `promptvit train --config config.yaml` (the run's configuration):",
            "",
            "```yaml",
            (run_dir / "config.yaml").read_text(encoding="utf-8").strip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


def _run_metrics(run_dir: Path | None) -> dict[str, Any] | None:
    if run_dir is None or not (run_dir / "metrics.json").is_file():
        return None
    try:
        return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except ValueError:
        return None


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
    **extra: Any,
) -> str:
    """Upload a PromptModel, an artifact folder or a run folder (artifact + card) to ``repo_id``.

    ``extra`` entries go into the artifact's config when ``source`` is a model (class_names, ...).
    Returns the URL of the commit.
    """
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="promptvit-hub-") as staging:
        folder = Path(staging)
        if hasattr(source, "save_pretrained"):  # a PromptModel (not imported: the model layer is above)
            source.save_pretrained(folder, **extra)
            run_dir = None
        else:
            artifact, run_dir = _artifact_and_run(Path(source))
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                (folder / name).write_bytes((artifact / name).read_bytes())
        info = read_artifact_config(folder)
        (folder / CARD_FILE).write_text(model_card(info, run_dir), encoding="utf-8")
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, repo_type="model", folder_path=str(folder), commit_message=commit_message
        )
    return str(getattr(commit, "commit_url", commit))
