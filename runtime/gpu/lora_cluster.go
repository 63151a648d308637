package gpu

import (
	"github.com/peftd/peftd/runtime/cuda"
)

// sgmv_cl (kernels/llama.cu) runs a fused group's whole LoRA update, the
// shrink and the expand, in one launch of thread-block clusters: each
// cluster takes one SGMV tile, its blocks split the input width and sum
// the shrink through the cluster's shared memory, then each expands its
// share of the output columns. For steps of few rows, where the two
// launches of the SGMV kernels (shrink, then expand) cost more than their
// bytes: one launch and no scratch round trip instead.
const (
	clCS       = 8 // CL_CS: blocks a cluster
	clThreads  = 256
	clMaxTiles = 64 // CL_MAXTILES
	clMaxRank  = 64 // CL_MAXR
	// clAutoRows is the most rows of a step whose updates take sgmv_cl
	// unless kernelForce.clRows says otherwise.
	clAutoRows = 16
	// clAutoClusters is the clusters a launch has unless
	// kernelForce.clClusters says otherwise (16 x 8 = 128 blocks).
	clAutoClusters = 16
	// clOptPrefetch (opts bit 0): each block asks L2 for its slice of A
	// before griddepcontrol.wait.
	clOptPrefetch = 1
)

// clRows is the most rows of a step whose LoRA updates take sgmv_cl (0:
// none; clusters need sm_90).
func (b *Backend) clRows() int {
	if b.fn.sgCl == nil || b.ctx.Device().Major < 9 {
		return 0
	}
	return forced(b.force.clRows, clAutoRows)
}

// clFits reports whether the step's LoRA updates may take sgmv_cl: few
// enough rows and tiles, every adapter's rank a multiple of 8 and at most
// clMaxRank (and no other LoRA kernel forced by kernelForce).
func (b *Backend) clFits() bool {
	if b.force.loraRows || b.force.loraV1 || b.force.loraV2 {
		return false
	}
	return b.rows() <= b.clRows() && !b.oddRank && b.stepRank > 0 && b.stepRank <= clMaxRank && b.nTiles > 0 && b.nTiles <= clMaxTiles
}

// clShared is sgmv_cl's dynamic shared memory for a group of slices
// projections and ranks up to rank: the block's partial sums, the sums it
// owns and the whole s, 16 rows of slices x rank tiles x 8 floats each.
func clShared(slices, rank int) int {
	return 4 * 3 * 16 * slices * ((rank + 7) / 8 * 8)
}

// loraCluster launches sgmv_cl on st for the group whose projections'
// outputs start at offs (offs[len] the width) in rows outStride values
// apart at outPtr, reading x (inF wide), and reports whether it did (false:
// the step or its adapters do not fit it; nothing was enqueued).
func (b *Backend) loraCluster(st *cuda.Stream, outPtr cuda.DevicePtr, outStride int, x *Buffer, offs []int, ms [3]int, inF, base, stride, acc int) bool {
	if !b.clFits() || inF%8 != 0 {
		return false
	}
	n := len(offs) - 1
	off1, off2 := slices12(offs)
	ncl := clAutoClusters
	if b.force.clClusters > 0 {
		ncl = b.force.clClusters
	}
	b.fail(b.fn.sgCl.LaunchCluster(st, cuda.Dim3{X: ncl * clCS}, cuda.Dim3{X: clThreads}, cuda.Dim3{X: clCS}, clShared(n, b.stepRank),
		outPtr, ptr(x), b.table, b.i32(b.off.tiles), b.nTiles, base, stride, ms[0], ms[1], ms[2], n, off1, off2, offs[n],
		b.stepRank, inF, x.ld, outStride, acc, forced(b.force.clOpts, clOptPrefetch)))
	b.g.capture.launched(st)
	return true
}
