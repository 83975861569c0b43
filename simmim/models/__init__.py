"""DeiT models with the API and checkpoint layout of Hugging Face Transformers (see `../shared/seeds/`)."""

from simmim.models.configuration import DeiTConfig
from simmim.models.deit import (
    BaseModelOutputWithPooling,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTForImageClassificationWithTeacherOutput,
    DeiTForMaskedImageModeling,
    DeiTModel,
    DeiTPreTrainedModel,
    ImageClassifierOutput,
    MaskedImageModelingOutput,
)
from simmim.models.image_processor import DeiTImageProcessor

# The head a run trains -> the DeiT class that carries it (model.head=cnn is a torchvision model instead).
MODEL_FOR_HEAD = {
    "mim": DeiTForMaskedImageModeling,
    "cls": DeiTForImageClassification,
    "distill": DeiTForImageClassificationWithTeacher,
}

__all__ = [
    "BaseModelOutputWithPooling",
    "DeiTConfig",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
    "DeiTForImageClassificationWithTeacherOutput",
    "DeiTForMaskedImageModeling",
    "DeiTImageProcessor",
    "DeiTModel",
    "DeiTPreTrainedModel",
    "ImageClassifierOutput",
    "MaskedImageModelingOutput",
    "MODEL_FOR_HEAD",
]
