"""spade_core: SPADE / GauGAN networks in plain PyTorch (never imports Ray)."""

from .checkpoint import load_checkpoint, read_config, save_checkpoint
from .config import DiscriminatorConfig, EncoderConfig, GeneratorConfig, LabelConfig, ModelConfig, SpadeConfig
from .discriminator import MultiscaleDiscriminator
from .encoder import ConvEncoder
from .generator import SPADEGenerator
from .model import SpadeModel, build_model
from .norms import SPADE
from .syncbn import SyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "ConvEncoder",
    "DiscriminatorConfig",
    "EncoderConfig",
    "GeneratorConfig",
    "LabelConfig",
    "ModelConfig",
    "MultiscaleDiscriminator",
    "SPADE",
    "SPADEGenerator",
    "SpadeConfig",
    "SpadeModel",
    "SyncBatchNorm",
    "build_model",
    "convert_sync_batchnorm",
    "load_checkpoint",
    "read_config",
    "save_checkpoint",
]
