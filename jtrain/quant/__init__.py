"""Weight quantisation: NF4/int8/int4 storage (QLoRA base weights), QAT and PTQ.

See docs/quantization.md. `QuantizedModel` stores selected kernels quantised and frozen and
dequantises them inside the compiled step; `QATModel` trains with fake-quantised kernels;
`post_training_quantize` quantises a trained model; `save_quantized`/`load_quantized` write
and read the result.
"""

from jtrain.quant.formats import (
                                  FORMATS,
                                  NF4_LEVELS,
                                  QuantFormat,
                                  QuantizedTensor,
                                  as_format,
                                  dequantize,
                                  quantize,
                                  storage_bits_per_param,
)
from jtrain.quant.io import load_quantized, save_quantized
from jtrain.quant.model import QuantizedModel, QuantReport, quantization_report
from jtrain.quant.ptq import (
                                  LossComparison,
                                  compare_eval_loss,
                                  evaluate_loss,
                                  post_training_quantize,
)
from jtrain.quant.qat import QATModel, export_quantized, fake_quantize

__all__ = [
                                  "FORMATS",
                                  "NF4_LEVELS",
                                  "LossComparison",
                                  "QATModel",
                                  "QuantFormat",
                                  "QuantReport",
                                  "QuantizedModel",
                                  "QuantizedTensor",
                                  "as_format",
                                  "compare_eval_loss",
                                  "dequantize",
                                  "evaluate_loss",
                                  "export_quantized",
                                  "fake_quantize",
                                  "load_quantized",
                                  "post_training_quantize",
                                  "quantization_report",
                                  "quantize",
                                  "save_quantized",
                                  "storage_bits_per_param",
]
