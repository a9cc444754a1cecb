"""Names shared between the code that writes a value and the code that reads it.

Metric keys travel from a trial (``tune.report``) to the driver (Tune callbacks, MLflow,
checkpoint scoring); checkpoint file names from a trial's checkpoint folder to the pool and the
reducer. A typo on one side would silently read nothing, so both sides import them from here.
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    """The Tune stages of one `ratatouille run`, in the order they run."""

    PRETRAIN = "pretrain"
    AUX_PROBE = "aux_probe"  # the linear probe each auxiliary task's runs start from
    AUX = "aux"
    PROBE = "probe"
    TARGET = "target"


class MetricKey(StrEnum):
    """Keys of the metrics a trial reports."""

    STEP = "step"  # present only in per-checkpoint reports: the x axis of the curves
    LOSS = "loss"
    ID_VAL_ACC = "id_val_acc"
    BEST_ID_VAL_ACC = "best_id_val_acc"
    BEST_STEP = "best_step"
    FINAL_ID_VAL_ACC = "final_id_val_acc"
    MA_ID_VAL_ACC = "ma_id_val_acc"  # the moving average of a robust auxiliary run
    DONE = "done"  # the closing report: the trial finished its schedule
    NODE_ID = "node_id"
    GPU_IDS = "gpu_ids"
    # in the closing report: a JSON record (data.identity) of the domains the trial read
    DATA_INPUT = "data_input"


#: Reported at every checkpoint step, logged as curves over steps.
CURVE_METRICS = (MetricKey.ID_VAL_ACC, MetricKey.LOSS)
#: Reported once when a trial finishes, logged as single values.
FINAL_METRICS = (
    MetricKey.FINAL_ID_VAL_ACC,
    MetricKey.BEST_ID_VAL_ACC,
    MetricKey.BEST_STEP,
    MetricKey.MA_ID_VAL_ACC,
)
#: Where a trial ran, reported with every result, logged as tags.
PLACEMENT_METRICS = (MetricKey.NODE_ID, MetricKey.GPU_IDS)


class WeightsFile(StrEnum):
    """Safetensors files (``<name>.safetensors``) of a trial's checkpoint."""

    MODEL = "model"  # a target run's best-ID-val Classifier state
    FEATURIZER = "featurizer"  # phi_pt (pretrain) or phi_aux (aux): the pool's entries
    FEATURIZER_MA = "featurizer_ma"  # phi_aux's moving average (robust auxiliary runs)
    HEAD = "head"  # w_lp (probe)

    @property
    def filename(self) -> str:
        return f"{self.value}.safetensors"


#: The weights file of a timm model folder or hub repo (what timm.models.save_for_hf writes).
HF_WEIGHTS_FILE = "model.safetensors"

#: The resumable training state (model, optimizer, RNG) in a trial's checkpoint.
TRAIN_STATE_FILE = "train_state.pt"

#: init_source of a run started from phi_pt (source 0, the pre-training task T0).
PRETRAINED = "pretrained"
#: init_source of a fusing run: a softmax(kappa) mixture of every source's featurizer.
FUSING = "fusing"
