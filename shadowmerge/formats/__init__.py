"""How tensors are stored on disk: `safetensors.py` (the file format: dtypes, headers) and `fp8.py` (FP8 block
quantization: detect, dequantize, quantize).

A weight stored in a form other than plain floating point is described by a *codec* on its TensorInfo
(checkpoint.py): readers get its float32 values from `codec.read_into`, never its stored bytes, and the plan
writes it as `codec.output_dtype` unless --dtype says otherwise. Another format later is one new file here and
one line in checkpoint.Checkpoint's scan.
"""
