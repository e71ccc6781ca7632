"""``PromptModel``: a timm backbone with one tuning method attached, and ``wrap`` to make one."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from timm.layers import DropPath
from torch import nn

from promptvit.artifact_format import (
    CONFIG_FILE,
    load_tuned_state,
    read_artifact_config,
    read_artifact_weights,
    resolve_artifact_dir,
    save_artifact,
)
from promptvit.backbones import (
    BackboneError,
    Geometry,
    adapter_for,
    backbone_source,
    base_model_call,
    body_parameters,
    classifier_name,
    find_weights_file,
    geometry_of,
    origin_of,
    rebuild_backbone,
    rebuild_problem,
    weights_fingerprint,
)
from promptvit.errors import ArtifactError, listed
from promptvit.hub import local_folder
from promptvit.io import atomic_write
from promptvit.layers.base import ForwardPlan, Injections
from promptvit.layers.selected_tokens import class_token_row
from promptvit.methods.base import ConfigError, Method, MethodConfig, get_method, make_config


@dataclasses.dataclass
class _Original:
    """What ``wrap`` changed in the backbone outside the method's ledger, to give it back unchanged."""

    #: what ``reset_classifier`` replaced (dotted name -> the module before wrap): the classifier, and whatever
    #: else timm builds anew with it (pooling, a distillation head, a head's norm); empty when the head is kept
    replaced: dict[str, nn.Module]
    num_classes: int
    requires_grad: list[tuple[nn.Parameter, bool]]
    #: backbone parameters tuned in place (bias, norm, partial, full; the head when it is kept) and buffers
    #: (BatchNorm statistics move in train mode), with their values at wrap time on the CPU
    weights: list[tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Original:
        # The saved values are never written to, so copies of a model (best-epoch snapshots) share them.
        return _Original(
            replaced={name: copy.deepcopy(module, memo) for name, module in self.replaced.items()},
            num_classes=self.num_classes,
            requires_grad=[(copy.deepcopy(p, memo), flag) for p, flag in self.requires_grad],
            weights=[(copy.deepcopy(t, memo), saved) for t, saved in self.weights],
        )


class PromptModel(nn.Module):
    """A backbone plus one method; ``forward(images)`` gives logits.

    Exactly the method's parameters and the classifier head have ``requires_grad``. The timm model
    contract (``forward_features``, ``forward_head``, ``get_classifier``) is passed through, so timm
    training code keeps working.

    Class-token readout: when the head reads only the class token (timm ViT, ``global_pool='token'``), the
    logits paths (``forward``, ``forward_from_block``) run the last block for that one row; every token still
    serves as key and value (:mod:`promptvit.layers.selected_tokens`). Same logits up to float rounding (about
    1e-7 in float32), a sixth of the last block's cost; the final norm then sees that row only. It stands aside
    while anything hooks into the last block and under gradient checkpointing; ``all_token_outputs()`` (the
    analysis recorders enter it) or ``plan.using(class_token_readout=False)`` turn it off. ``forward_features`` always
    returns every token.
    """

    def __init__(
        self,
        backbone: nn.Module,
        method: Method,
        source: dict[str, Any],
        base_fingerprint: str,
        original: _Original | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.method = method
        self.adapter = adapter_for(backbone)
        #: what ``wrap`` changed outside the method's ledger (head, tuned weights, requires_grad), to undo it
        self._original = original
        #: the class-token readout's forward override of the last block (the forward plan's one change)
        self._plan_injections = Injections()
        #: how to rebuild the backbone (timm name, pretrained or local weights file, build options)
        self.source = source
        #: hash of the backbone weights before tuning; an artifact only fits a backbone with the same hash
        self.base_fingerprint = base_fingerprint
        self.head_name = method.head_name(backbone)
        self._install_class_token_readout()

    @property
    def geometry(self) -> Geometry:
        return self.method.geometry

    @property
    def config(self) -> MethodConfig:
        return self.method.config

    @property
    def num_classes(self) -> int:
        """Outputs of the head: a linear or 1x1-conv classifier's width (timm 1.0.9's ``reset_classifier``
        leaves ``num_classes`` behind on some models, e.g. RegNet and SAM's ViT), else timm's ``num_classes``."""
        head = self.get_classifier()
        if isinstance(head, nn.Linear):
            return head.out_features
        if isinstance(head, nn.Conv2d):
            return head.out_channels
        return self.backbone.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        geometry = self.geometry
        if (
            geometry.kind == "vit"
            and not geometry.dynamic_img_size
            and tuple(images.shape[-2:]) != geometry.img_size
        ):
            height, width = geometry.img_size
            raise ValueError(
                f"the model was built for {height}x{width} inputs but got {images.shape[-2]}x{images.shape[-1]}; "
                "resize the images (the transforms of promptvit.data do) or wrap a backbone built for that size"
            )
        with self._logits_pass():
            return self.backbone(images)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(images)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.backbone.forward_head(features, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.backbone.get_submodule(self.head_name)

    def reset_classifier(self, num_classes: int) -> None:
        """A new, trainable head with ``num_classes`` outputs (timm's ``reset_classifier``); a head the method
        built (an MLP head) keeps its hidden layers and gets a new last layer."""
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        if self.head_name == classifier_name(self.backbone):
            replaced = self.adapter.reset_classifier(num_classes)
            if self._original is not None:  # disable/unload put the pre-wrap modules back
                for name, module in replaced.items():
                    self._original.replaced.setdefault(name, module)
        else:
            last = self.get_classifier()
            parent, _, child = self.head_name.rpartition(".")
            setattr(
                self.backbone.get_submodule(parent),
                child,
                nn.Linear(last.in_features, num_classes, device=last.weight.device, dtype=last.weight.dtype),
            )
            self.backbone.num_classes = num_classes
        for head in [self.get_classifier(), *self.extra_heads()]:
            head.requires_grad_(True)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The backbone's timm ``pretrained_cfg`` (preprocessing, licence...), as on a timm model."""
        return self.backbone.pretrained_cfg

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of :attr:`pretrained_cfg`."""
        return self.pretrained_cfg

    # ------------------------------------------------------------------ frozen-prefix caching

    def cache_cut(self) -> int:
        """Deepest point whose output is frozen and deterministic: ``method.tuned_from_block()``, checked.

        ``0``: nothing can be cached. ``l`` in ``1..depth-1`` (ViT): the token sequence at the input of
        ``blocks[l]``. ``depth``: the pre-logit features (ViT and CNN; for CNNs the only cut supported).
        """
        cut = int(self.method.tuned_from_block())
        depth = self.geometry.depth
        if not 0 <= cut <= depth:
            raise ValueError(
                f"method '{self.method.name}' reports tuned_from_block={cut}, outside 0..{depth}"
            )
        if self.method.trains_backbone:
            return 0
        if cut == depth and not self.adapter.head_reads_pre_logits():
            return 0  # the logits need more than the pre-logit features (generic adapter: branch heads...)
        random = {id(m) for m in _stochastic_depth(self.backbone)}
        if self.geometry.kind != "vit":
            return cut if cut == depth and not random else 0
        # Stochastic depth trains with the model (see ``train``): the prefix ends before its first such block.
        blocks = self.adapter.blocks
        random_blocks = [i for i, b in enumerate(blocks) if any(id(m) in random for m in b.modules())]
        return min([cut, *random_blocks])

    def _check_cut(self, block: int) -> None:
        depth = self.geometry.depth
        if not 0 <= block <= depth:
            raise ValueError(f"block {block} is out of range 0..{depth} for this backbone")
        if self.geometry.kind != "vit" and block not in (0, depth):
            raise ValueError(
                f"{self.geometry.architecture} is a CNN: only the pre-logit features (block={depth}) can be cut"
            )

    def forward_prefix(self, images: torch.Tensor, block: int) -> torch.Tensor:
        """The frozen part of the forward up to the cut ``block`` (see :meth:`cache_cut`).

        ViT, ``block < depth``: ``patch_embed -> _pos_embed -> patch_drop -> norm_pre -> blocks[:block]``
        (hooks of those blocks run). ``block == depth``: ``forward_head(forward_features(x), pre_logits=True)``,
        the input of the classifier. ``forward_from_block(forward_prefix(x, l), l) == forward(x)``.
        """
        self._check_cut(block)
        if block == self.geometry.depth:
            with self._logits_pass():
                return self.adapter.pre_logits(images)
        if self.geometry.kind != "vit":
            return images
        x = self.adapter.embed(images)
        return self.adapter.forward_blocks(x, self.adapter.blocks[:block])  # with the family's positions

    def forward_from_block(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """Logits from the output of :meth:`forward_prefix` at the same ``block``.

        Runs ``blocks[block:]`` (through their modules, so the method's pre-hooks on those blocks, e.g. token
        prompts and activation prompts, and its hook on ``norm``, which strips prompt tokens, all run),
        then ``norm`` and ``forward_head``. With ``block == depth`` only the classifier runs. Honours timm's
        gradient checkpointing (``backbone.set_grad_checkpointing``).
        """
        self._check_cut(block)
        backbone = self.backbone
        if block == self.geometry.depth:
            return self.adapter.classify(x)
        if self.geometry.kind != "vit":
            return backbone(x)
        with self._logits_pass():
            x = self.adapter.forward_blocks(x, self.adapter.blocks[block:])
            return backbone.forward_head(self.adapter.final_norm(x))

    # ------------------------------------------------------------------ class-token readout

    def _install_class_token_readout(self) -> None:
        """Route the last block through :meth:`_last_block_forward` when timm's own head reads its output."""
        adapter = self.adapter
        if not (
            adapter.kind == "vit"
            and adapter.reads_class_token_only()
            and adapter.supports_selected_rows(len(adapter.blocks) - 1)
        ):
            return
        last = adapter.blocks[-1]
        # Wraps whatever forward the block had (token prompts may have overridden it).
        block_forward = last.forward
        self._plan_injections.override_forward(
            last, functools.partial(self._last_block_forward, last, block_forward)
        )

    @property
    def plan(self) -> ForwardPlan:
        """How forwards run (class-token readout, prompt-output skipping), shared with the method."""
        return self.method.plan

    def all_token_outputs(self) -> contextlib.AbstractContextManager[ForwardPlan]:
        """Within the block every block computes every token's output: no class-token readout, and token-prompt
        methods keep their prompt outputs. Same logits, more work; for tools that read hidden tokens."""
        return self.plan.using(class_token_readout=False, skip_prompt_outputs=False)

    def _logits_pass(self) -> contextlib.AbstractContextManager[ForwardPlan]:
        return self.plan.using(logits=True)

    def _reads_class_token_only(self, block: nn.Module) -> bool:
        backbone = self.backbone
        return (
            self.plan.logits
            and self.plan.class_token_readout
            and self.adapter.reads_class_token_only()
            # a checkpointed block is recomputed in backward, outside this pass, so it must not depend on it
            and not (getattr(backbone, "grad_checkpointing", False) and torch.is_grad_enabled())
            # hooks inside the block, or on its output, may read rows other than the class token
            and not block._forward_hooks
            and not any(m._forward_hooks or m._forward_pre_hooks for m in block.modules() if m is not block)
        )

    def _last_block_forward(
        self, block: nn.Module, block_forward: Callable[..., torch.Tensor], x: torch.Tensor, *args, **kwargs
    ) -> torch.Tensor:
        if args or kwargs or not self._reads_class_token_only(block):
            return block_forward(x, *args, **kwargs)
        return self.adapter.forward_block_rows(len(self.adapter.blocks) - 1, x, class_token_row)

    def _modules_in_train_mode(self) -> list[nn.Module]:
        if self.method.trains_backbone:
            return [self.backbone]
        return [*self.method.modules_in_train_mode(self.backbone), self.get_classifier()]

    #: re-estimate BatchNorm running statistics in tuned modules; off by default (few-shot batches of a
    #: handful of images give useless estimates), set by ``TrainConfig.batchnorm_stats``
    update_batchnorm_stats: bool = False

    def train(self, mode: bool = True) -> PromptModel:
        """Frozen parts stay in eval mode (no dropout, BatchNorm statistics fixed) unless the method tunes them;
        stochastic depth that the build options ask for (``backbone.options.drop_path_rate`` > 0) trains with
        the model.

        BatchNorm layers stay in eval mode (their pretrained running statistics in use and unchanged) even
        in tuned modules, unless ``update_batchnorm_stats``; their affine weights still train.
        """
        self.training = mode
        self.backbone.eval()
        # Stochastic depth asked for through the backbone options (timm's drop_path_rate) acts in training
        # whatever the method, as in DA-VPT's and SPT's code.
        for module in _stochastic_depth(self.backbone):
            module.train(mode)
        for module in self._modules_in_train_mode():
            module.train(mode)
            if mode and not self.update_batchnorm_stats:
                for norm in module.modules():
                    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                        norm.eval()
        self.method.train(mode)
        return self

    def extra_heads(self) -> list[nn.Module]:
        """Classifier modules besides the main one (a distilled ViT's distillation head), tuned with it."""
        main = self.backbone.get_submodule(classifier_name(self.backbone))
        return [m for m in adapter_for(self.backbone).classifier_modules() if m is not main]

    def tuned_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def tuned_state_dict(self) -> dict[str, torch.Tensor]:
        """Tuned parameters plus the buffers that training can change: exactly what an artifact stores.

        Those buffers are the method's own and those of modules trained in train mode (BatchNorm statistics).
        """
        state = {name: p.detach() for name, p in self.tuned_named_parameters()}
        names = {id(m): n for n, m in self.named_modules()}
        for module in [self.method, *self._modules_in_train_mode()]:
            prefix = names[id(module)]
            persistent = module.state_dict(keep_vars=True)  # not index tables rebuilt at init (Swin)
            state.update({f"{prefix}.{n}": b.detach() for n, b in module.named_buffers() if n in persistent})
        return state

    def parameter_summary(self) -> dict[str, int]:
        """Tuned parameter counts by group (head, method), plus tuned and total."""
        heads = [self.get_classifier(), *self.extra_heads()]
        head = sum(p.numel() for m in heads for p in m.parameters() if p.requires_grad)
        tuned = sum(p.numel() for _, p in self.tuned_named_parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"method": tuned - head, "head": head, "tuned": tuned, "total": total}

    def print_trainable_parameters(self) -> str:
        """Print and return a one-line summary in the style of peft."""
        s = self.parameter_summary()
        line = (
            f"method {self.method.name}: tuned params {s['tuned']:,} (method {s['method']:,} + head {s['head']:,})"
            f" || all params {s['total']:,} || tuned% {100 * s['tuned'] / s['total']:.4f}"
        )
        print(line)
        return line

    # ------------------------------------------------------------------ disable and unload

    def _merged(self) -> bool:
        return bool(getattr(self.method, "merged", False))

    @torch.no_grad()
    def _swap_original(self) -> Callable[[], None]:
        """Put the pre-wrap head and weights in; returns the function that puts the tuned ones back."""
        original, backbone = self._original, self.backbone
        tuned_classes = backbone.num_classes
        # outer modules first, so that a module recorded inside another lands in the right one
        names = sorted(original.replaced, key=lambda name: name.count("."))
        tuned_modules = {name: _submodule(backbone, name) for name in names}
        tuned = [(p, p.detach().clone()) for p, _ in original.weights]
        for parameter, saved in original.weights:
            parameter.copy_(saved)
        for name in names:
            _set_submodule(backbone, name, original.replaced[name])
        backbone.num_classes = original.num_classes

        @torch.no_grad()
        def restore() -> None:
            for parameter, value in tuned:
                parameter.copy_(value)
            for name, module in tuned_modules.items():
                _set_submodule(backbone, name, module)
            backbone.num_classes = tuned_classes

        return restore

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the backbone computes exactly what it computed before ``wrap``.

        Every hook, injected layer and forward override of the method (and of the class-token readout) is
        taken out, weights the method tunes in place and the classifier are swapped for their pre-wrap
        values, a merged method is unmerged; all of it comes back on exit.
        """
        if self._original is None:
            raise RuntimeError("this model was not made by wrap(); nothing to disable")
        merged = self._merged()
        if merged:
            self.unmerge()
        self._plan_injections.deactivate()
        self.method.injections.deactivate()
        restore = self._swap_original()
        try:
            yield
        finally:
            restore()
            self.method.injections.activate()
            self._plan_injections.activate()
            if merged:
                self.merge()

    def unload(self) -> nn.Module:
        """Take the method out and return the backbone as it was before ``wrap`` (weights, head, flags).

        The tuned tensors stay with this ``PromptModel``, which cannot run afterwards.
        """
        if self._original is None:
            raise RuntimeError("this model was not made by wrap(); nothing to unload")
        if self._merged():
            self.unmerge()
        self._plan_injections.deactivate()
        self.method.injections.deactivate()
        self._swap_original()
        backbone = self.backbone
        for parameter, flag in self._original.requires_grad:
            parameter.requires_grad_(flag)
        del backbone.promptvit_wrapped
        self._original = None
        self.backbone = nn.Identity()
        self.adapter = None
        return backbone

    def merge(self) -> None:
        self.method.merge()

    def unmerge(self) -> None:
        self.method.unmerge()

    def merge_problem(self) -> str | None:
        """Why the method cannot be folded into the backbone's own weights, or None when it can (then
        :meth:`merge_and_unload` and the merged-timm export work)."""
        own = [n for n in self.tuned_state_dict() if not n.startswith("backbone.")]
        if own:
            return f"it adds tensors of its own ({listed(own)})"
        names = {id(m): n for n, m in self.backbone.named_modules()}
        injections = self.method.injections
        hooked = [e.module for kind in ("pre_hook", "hook", "forward") for e in injections.entries(kind)]
        if hooked:
            return f"it changes the forward of {listed(dict.fromkeys(names.get(id(m), '?') for m in hooked))}"
        replaced = [f"{names.get(id(e.module), '?')}.{e.name}".lstrip(".") for e in injections.entries("replace")]
        if replaced and not self.method.merges():
            return f"its layers in {listed(replaced)} do not fold into the backbone's weights"
        return None

    def merge_and_unload(self) -> nn.Module:
        """The plain timm backbone with the method folded into its weights and the tuned head (peft's
        ``merge_and_unload``); ``ConfigError`` where the method does not live in the backbone's weights.

        The ``PromptModel`` cannot run afterwards; :meth:`unload` gives the untouched backbone instead.
        """
        if self._original is None:
            raise RuntimeError("this model was not made by wrap(); nothing to merge and unload")
        problem = self.merge_problem()
        if problem is not None:
            raise ConfigError(
                f"method '{self.method.name}' cannot be merged into the backbone: {problem}; unload() gives "
                "the backbone back without it, and an ONNX export keeps it"
            )
        if self.method.injections.entries("replace"):
            self.merge()
        self._plan_injections.deactivate()
        self.method.injections.deactivate()  # merged layers give back their base layers, now holding the sum
        backbone = self.backbone
        for parameter, flag in self._original.requires_grad:
            parameter.requires_grad_(flag)
        del backbone.promptvit_wrapped
        self._original = None
        self.backbone = nn.Identity()
        self.adapter = None
        return backbone

    def save_pretrained(self, directory: str | Path, **extra: Any) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (tuned parameters only).

        The config records how the backbone was built (``self.source``); where that record cannot rebuild it
        (weights of unknown origin), a warning says so and ``load`` will need ``base_model=``.
        """
        problem = rebuild_problem(self.source)
        if problem is not None:
            warnings.warn(
                f"{directory}: the backbone cannot be rebuilt from the artifact ({problem}); loading it needs "
                f"base_model={base_model_call(self.source)} with the weights it was trained on. Build the "
                "backbone with promptvit.create_backbone (Hub name, local weights file or init_seed) to record it",
                stacklevel=2,
            )
        return save_artifact(self, directory, **extra)

    def save_peft_adapter(self, directory: str | Path) -> Path:
        """Write the method as a Hugging Face peft adapter (``adapter_config.json``, ``adapter_model.safetensors``):
        ``PeftModel.from_pretrained(<the timm base with num_classes outputs>, directory)`` then computes these
        logits. ``ConfigError`` where peft has no equivalent of the method."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        form = self.method.peft_form(self.backbone)
        if form is None:
            raise ConfigError(f"method '{self.method.name}' has no Hugging Face peft equivalent")
        names = {id(m): n for n, m in self.backbone.named_modules()}
        heads = [self.head_name, *(names[id(m)] for m in self.extra_heads())]
        config = LoraConfig(**form.config, modules_to_save=heads, init_lora_weights=False)
        config.base_model_name_or_path = self.source.get("name")
        tensors = {f"base_model.model.{n}": t for n, t in form.tensors.items()}
        for head in heads:
            for name, tensor in self.backbone.get_submodule(head).state_dict().items():
                tensors[f"base_model.model.{head}.{name}"] = tensor.detach()
        directory = Path(directory)
        config.save_pretrained(str(directory))
        state = {k: v.contiguous().cpu() for k, v in tensors.items()}
        atomic_write(directory / "adapter_model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        return directory

    def push_to_hub(self, repo_id: str, **options: Any) -> str:
        """Upload the artifact and a model card to the Hugging Face Hub (a LoRA also as a peft adapter in
        ``peft/``); see :func:`promptvit.hub.push_to_hub`."""
        from promptvit.hub import push_to_hub

        return push_to_hub(self, repo_id, **options)

    @classmethod
    def from_pretrained(
        cls, source: str | Path, base_model: nn.Module | None = None, *, check_weights: bool = True
    ) -> PromptModel:
        """Load an artifact: a folder, a run folder or ``hf-hub:ORG/NAME[@revision]`` (online or from the cache).

        The backbone is rebuilt from the artifact's record of how it was built, or ``base_model`` (a plain timm
        model) is used; it must have the geometry the artifact was trained on and, unless
        ``check_weights=False``, the same weights (compared by fingerprint). ``ArtifactError`` says what differs.
        """
        directory = resolve_artifact_dir(local_folder(source))
        config = read_artifact_config(directory)
        weights_path, state = read_artifact_weights(directory, config)
        try:
            saved = Geometry.from_dict(config["geometry"]).to_dict()
            method_cls = get_method(config["method"])
            method_config = method_cls.config_class.from_dict(config["method_config"], method=method_cls.name)
        except ValueError as error:  # ConfigError too
            raise ArtifactError(
                f"{directory / CONFIG_FILE} is damaged or from a promptvit with other methods ({error}); re-save it"
            ) from error
        given = base_model is not None
        if base_model is None:
            base_model = _rebuild_base(config, directory)
        adapter_for(base_model).reset_classifier(config["num_classes"])
        actual = geometry_of(base_model).to_dict()
        differences = [f"{k}: artifact {v} vs model {actual[k]}" for k, v in saved.items() if v != actual[k]]
        if differences:
            raise ArtifactError(f"{directory} was trained on another backbone geometry ({', '.join(differences)})")
        model = wrap(base_model, method_config)
        if check_weights and config["base_fingerprint"] != model.base_fingerprint:
            raise ArtifactError(
                f"{directory} was trained on other backbone weights (fingerprint {config['base_fingerprint']} "
                f"vs {model.base_fingerprint} of the {'given' if given else 'rebuilt'} model, base "
                f"'{config['base_model'].get('name')}'). Load it with "
                f"base_model={base_model_call(config['base_model'])} holding the weights it was trained on "
                "(check_weights=False skips this check)"
            )
        load_tuned_state(model, state, str(weights_path))
        return model


def _rebuild_base(config: dict[str, Any], directory: Path) -> nn.Module:
    """The backbone an artifact records (:mod:`promptvit.backbones.source`), or an ``ArtifactError`` saying what to do."""
    record = config["base_model"]
    problem = rebuild_problem(record)
    if problem is not None:
        raise ArtifactError(
            f"{directory} cannot rebuild its backbone: {problem}. Load it from Python with "
            f"base_model={base_model_call(record)} holding the weights it was trained on"
        )
    weights_file = None
    if origin_of(record) == "file":
        weights_file = find_weights_file(record, directory)
        if weights_file is None:
            name = Path(record["weights"]).name
            raise ArtifactError(
                f"the backbone weights file {record['weights']} named in {directory / CONFIG_FILE} is not there: "
                f"copy it back, or to {directory / name}, or set base_model.weights in that file to where it is now"
            )
    try:
        return rebuild_backbone(record, weights_file)
    except BackboneError as error:
        raise ArtifactError(f"cannot rebuild the backbone of {directory}: {error}") from error


def _submodule(root: nn.Module, name: str) -> nn.Module | None:
    parent, _, child = name.rpartition(".")
    return getattr(root.get_submodule(parent) if parent else root, child, None)


def _set_submodule(root: nn.Module, name: str, module: nn.Module | None) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def wrap(
    model: nn.Module,
    method: str | MethodConfig = "linear",
    *,
    num_classes: int | None = None,
    base_model_name: str | None = None,
    **options: Any,
) -> PromptModel:
    """Attach a tuning method to a timm model and freeze everything else.

    Args:
        model: a timm ViT (or, for methods that allow it, a timm CNN); it is modified in place.
        method: a registered method name (see ``available_methods()``) or a method config object.
        num_classes: size of a new classifier head; ``None`` keeps the model's own head.
        base_model_name: timm name (with pretrained tag) recorded in saved artifacts so that ``load``
            can rebuild the backbone; by default read from the model (:mod:`promptvit.backbones.source`).
        **options: the method's options, e.g. ``prompt_length=20, deep=True`` for ``vpt``.
    """
    if isinstance(model, PromptModel):
        raise ConfigError("this model is already wrapped; wrap the plain timm backbone instead")
    if getattr(model, "promptvit_wrapped", False):
        raise ConfigError(
            "this backbone is already wrapped by another PromptModel (wrapping changes it in place); wrap a "
            "fresh backbone or copy.deepcopy(backbone), or call unload() on the first model"
        )
    method_cls, config = make_config(method, **options)
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    adapter = adapter_for(model)
    geometry = adapter.geometry()
    if not method_cls.supports(adapter):
        raise ConfigError(
            f"method '{method_cls.name}' supports {', '.join(method_cls.supported_kinds)} backbones, "
            f"not {geometry.architecture} ({geometry.kind})" + (f": {adapter.kind_note}" if adapter.kind_note else "")
        )
    original = _Original(
        replaced={},
        num_classes=model.num_classes,
        requires_grad=[(p, p.requires_grad) for p in model.parameters()],
    )
    original_buffers = {id(b) for b in model.buffers()}
    # The head is new or replaced per task, so only the body identifies the backbone.
    fingerprint = weights_fingerprint(body_parameters(model))
    source = backbone_source(model, fingerprint)  # read before the head changes (num_classes is an option)
    if base_model_name is not None:
        source["name"] = base_model_name
    if num_classes is not None:
        original.replaced = adapter.reset_classifier(num_classes)
    if model.num_classes < 1:
        raise ConfigError("the model has no classifier (num_classes=0); pass num_classes to wrap()")
    model.requires_grad_(False)
    tuner = method_cls(config, geometry)
    tuner.attach(model)
    for parameter in tuner.backbone_parameters_to_tune(model):
        parameter.requires_grad_(True)
    wrapped = PromptModel(model, tuner, source, fingerprint, original)
    wrapped.get_classifier().requires_grad_(True)
    for extra in wrapped.extra_heads():
        extra.requires_grad_(True)
    before = {id(p) for p, _ in original.requires_grad}
    changeable = [p for p in model.parameters() if p.requires_grad and id(p) in before]
    changeable += [b for b in model.buffers() if id(b) in original_buffers]
    original.weights = [(t, t.detach() if t.is_meta else t.detach().to("cpu", copy=True)) for t in changeable]
    model.promptvit_wrapped = True
    wrapped.train(model.training)
    return wrapped


def _stochastic_depth(backbone: nn.Module) -> list[nn.Module]:
    """timm's DropPath modules of ``backbone`` that drop something, when its build options asked for them.

    Only an explicit ``drop_path_rate`` (``create_backbone``'s record, ``backbone.options``) counts: a
    family's own default rate (timm builds Swin with 0.1) stays off in a frozen backbone, as it always was.
    """
    options = getattr(backbone, "promptvit_source", {}).get("kwargs", {})
    if not options.get("drop_path_rate"):
        return []
    return [m for m in backbone.modules() if isinstance(m, DropPath) and m.drop_prob > 0]
