"""neurokern.tint: AdaMerging coefficients, Model Tinting test-time training, and tinted
(task-routed) inference for batches that mix tasks.

    from neurokern.tint import TintedModel, fit
    model = TintedModel(net, base, finetuned, tint_layers=["head"], coefficients="layer", prior=0.3)
    history = fit(model, inputs_per_task, teachers, loss="pseudo_conf", steps=500)
    logits = model(x, task_ids)          # rows of different tasks in one batch
    model.save("tinted/"); model = TintedModel.load("tinted/", net)
"""
from neurokern.tint.fit import fit
from neurokern.tint.losses import confidence_mask, entropy, pseudo, pseudo_conf
from neurokern.tint.model import TintedModel

__all__ = ["TintedModel", "confidence_mask", "entropy", "fit", "pseudo", "pseudo_conf"]
