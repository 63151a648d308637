package kernels

// Sgmv is the fused LoRA (SGMV v2) kernel source used by runtime/gpu's LoRA
// op (kernels sgmv_fused1 and sgmv_fused4). A separate module from Llama: a
// backend that cannot build it keeps the v1 SGMV kernels of llama.cu.
const Sgmv = "sgmv.cu"
