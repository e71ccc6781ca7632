"""Analysis tools: measures as pure functions on tensors/arrays, thin extraction helpers on a model,
plotting functions (Agg, no pyplot), and the ``analyze`` orchestrator.

Views and the papers they follow:

* ``calibration``: within/between-class scatter, PC1 histograms, PCA + KDE, t-SNE (EPT §3.3, Fig. 2);
* ``nmi``: prompt/patch normalised mutual information (SPT eq. 7-8);
* ``cka``: linear/RBF CKA, prompt-vs-patch CKA across layers (SPT Fig. S4), layer x layer CKA between
  two models (AP Fig. 5A);
* ``attention``: attention extraction, average attention distance (AP §4.1), CLS/prompt maps (DA-VPT Fig. 3);
* ``efficiency``: the efficiency portrait (AP Table 2);
* ``report.analyze``: all applicable views of a model on a dataset, PNGs + ``analysis.json``.

Analysis reads models and data only; it never imports the training engine or the CLI.
"""

from promptvit.analysis.attention import (
    AttentionRecorder,
    LayerAttention,
    attention_distance,
    average_attention_distance,
    capture_attention,
    cls_attention_map,
    cls_attention_share,
    layer_attention_distance,
    plot_attention_distance,
    plot_attention_maps,
    prompt_attention_maps,
)
from promptvit.analysis.calibration import (
    calibration_view,
    pc1_histograms,
    pca_embedding,
    plot_calibration,
    scatter_stats,
    tsne_embedding,
)
from promptvit.analysis.cka import (
    cka_matrix,
    layer_cka,
    linear_cka,
    model_prompt_patch_cka,
    plot_cka_heatmap,
    prompt_patch_cka,
    rbf_cka,
)
from promptvit.analysis.efficiency import efficiency_portrait, efficiency_table, plot_efficiency
from promptvit.analysis.extract import TokenLayout, extract_features, layer_representations
from promptvit.analysis.nmi import joint_distribution, layer_nmi, nmi_from_joint, plot_nmi, prompt_patch_nmi
from promptvit.analysis.report import analyze

__all__ = [
    "AttentionRecorder",
    "LayerAttention",
    "TokenLayout",
    "analyze",
    "attention_distance",
    "average_attention_distance",
    "calibration_view",
    "capture_attention",
    "cka_matrix",
    "cls_attention_map",
    "cls_attention_share",
    "efficiency_portrait",
    "efficiency_table",
    "extract_features",
    "joint_distribution",
    "layer_attention_distance",
    "layer_cka",
    "layer_nmi",
    "layer_representations",
    "linear_cka",
    "model_prompt_patch_cka",
    "nmi_from_joint",
    "pc1_histograms",
    "pca_embedding",
    "plot_attention_distance",
    "plot_attention_maps",
    "plot_calibration",
    "plot_cka_heatmap",
    "plot_efficiency",
    "plot_nmi",
    "prompt_attention_maps",
    "prompt_patch_cka",
    "prompt_patch_nmi",
    "rbf_cka",
    "scatter_stats",
    "tsne_embedding",
]
