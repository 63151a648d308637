package gpu

import (
	"github.com/peftd/peftd/runtime/cuda"
)

// add_rmsnorm over a cluster of blocks a row (add_rmsnorm_cl,
// kernels/llama.cu), where it adds a LoRA update.
//
// add_rmsnorm is one block a row. After the o and down products of a step
// with adapters it also adds their float32 LoRA update from the LoRA
// stream: 32 KB a row at hidden 4,096 besides x and the product's output,
// all read by one SM. add_rmsnorm_cl spreads each row over addCl blocks
// (the row's sum of squares and max through distributed shared memory).
// Measured on an H200 with four rank-32 adapters (v0.40, two calls, device
// ms a step, add_rmsnorm_cl vs add_rmsnorm): FP8 16 rows 3.83 / 3.87 vs
// 3.92 / 3.91, 1 and 4 rows within 0.03 either way; bf16 1 / 16 rows 4.38
// / 5.14 and 4.40 / 5.15 vs 4.43 / 5.17 and 4.43 / 5.16. In the base steps
// (no update to read) it was slower, FP8 1 / 4 / 16 rows 2.79 / 3.33 /
// 3.59 vs 2.75 / 3.30 / 3.53, and so at 32-64 rows either way (FP8 base
// 64 rows 5.00 vs 4.87): it takes the adds of an update at 1-16 rows. Expanding
// the o and down updates inside it (the LoRA stream running their shrink
// alone) was slower still: FP8 2.98 / 3.74 / 3.94, bf16 4.50 / 5.27
// (docs/TRIED.md).

// addCl, addClThreads and addClPairs are ADD_CL, ADD_CL_THREADS and
// ADD_CL_PR in llama.cu; addClRows is the most rows add_rmsnorm_cl takes
// by default.
const (
	addCl        = 8
	addClThreads = 256
	addClPairs   = 2
	addClRows    = 16
)

// addClFits reports whether this step's add_rmsnorm of rows h wide (with a
// delta and an output; update: it adds a LoRA update too) runs as
// add_rmsnorm_cl: by default steps of up to addClRows rows adding an
// update (kernelForce.addCl: 1 wherever it fits, -1 never); sm_90 and
// later; h a multiple of 2 * addCl, at most 2 * addCl * addClThreads *
// addClPairs.
func (b *Backend) addClFits(h int, update bool) bool {
	return forcedOn(b.force.addCl, update && b.rows() <= addClRows) && b.ctx.Device().Major >= 9 && h%(2*addCl) == 0 &&
		h/(2*addCl) <= addClThreads*addClPairs
}

// addRMSNormCl enqueues add_rmsnorm_cl: x += delta (plus the float32
// update d2 in the rows with an adapter), out = rmsnorm(x) * w, and with q
// set out quantized into q and qs.
func (b *Backend) addRMSNormCl(x, d, o *Buffer, d2, w cuda.DevicePtr, eps float32, q, qs cuda.DevicePtr) {
	if d2 != 0 {
		b.addClUpdates++
	}
	b.launchCluster(b.fn.addRMSNormCl, cuda.Dim3{X: b.rows() * addCl}, cuda.Dim3{X: addClThreads}, cuda.Dim3{X: addCl},
		x.mem, ptr(d), d2, b.rowLora(), ptr(o), w, eps, x.cols, q, qs)
}
