package kernels

// FP8 is the FP8 (e4m3) quantization kernel source used by runtime/gpu's
// FP8 weight path (kernel quant_rows_e4m3). It is a separate module from
// Llama so that a bf16-only backend never compiles it.
const FP8 = "fp8.cu"
