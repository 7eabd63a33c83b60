"""Errors lora-fx raises. Each message says what is wrong and what to do about it."""


class LoraFxError(Exception):
    """Base class of every error lora-fx raises on purpose."""


class TargetError(LoraFxError, ValueError):
    """`targets` (or `trainable`) names nothing that can be adapted, or the module holds no LoRA."""


class ConfigError(LoraFxError, ValueError):
    """A hyper-parameter (rank, alpha, dropout, init, block spec) is out of range."""


class InputsError(LoraFxError, TypeError):
    """Example inputs or call inputs do not fit the model's forward signature."""


class CaptureError(LoraFxError, RuntimeError):
    """torch.export could not capture the model."""


class FoldError(LoraFxError, ValueError):
    """LoRA cannot be folded into the base weights."""


class AdapterFileError(LoraFxError, ValueError):
    """An adapter folder or file is missing, unsafe, corrupt or does not fit the model."""


class AdapterNameError(LoraFxError, KeyError):
    """No adapter of that name (in a graph module, a fold, a mixed batch or a server)."""

    def __str__(self) -> str:  # KeyError's own str() would quote the whole message
        return str(self.args[0]) if self.args else ""


class CheckpointError(LoraFxError, ValueError):
    """A model checkpoint (base weights) or a training checkpoint is missing, incomplete, or does not fit the graph."""
