"""Low-bit number formats, rounding, quantized layers and their serialisation (layer 1)."""

from zolm.quant.formats import QuantConfig, QuantFormat
from zolm.quant.linear import QuantEmbedding, QuantLinear, quantize_, quantized_modules
