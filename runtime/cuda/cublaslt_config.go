package cuda

import (
	"encoding/binary"
	"fmt"
	"slices"
	"unsafe"
)

// cuBLASLt's algorithm configuration (cublasLtMatmulAlgoConfigAttributes_t)
// and capability (cublasLtMatmulAlgoCapAttributes_t) attributes that
// configVariants reads and sets.
const (
	algoConfigTileID    = 1 // CUBLASLT_ALGO_CONFIG_TILE_ID (cublasLtMatmulTile_t)
	algoConfigStagesID  = 6 // CUBLASLT_ALGO_CONFIG_STAGES_ID (cublasLtMatmulStages_t)
	algoConfigClusterID = 8 // CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID (cublasLtClusterShape_t)
	algoCapTileIDs      = 6 // CUBLASLT_ALGO_CAP_TILE_IDS
	algoCapStagesIDs    = 13
	// heuristicWorkspaceOffset is where cublasLtMatmulHeuristicResult_t
	// keeps the workspace bytes the algorithm needs (a size_t after the
	// 64-byte algorithm).
	heuristicWorkspaceOffset = 64
)

// clusterShapes are the thread-block cluster shapes configVariants tries
// besides an algorithm's own (cublasLtClusterShape_t: 2 is 1x1x1, 3 2x1x1,
// 5 1x2x1, 6 2x2x1).
var clusterShapes = []uint32{2, 3, 5, 6}

// tileNames are cublasLtMatmulTile_t's names (rows of D by its columns: in
// GemmTN's column-major view, weight rows by activation rows), by id.
var tileNames = []string{"undef", "8x8", "8x16", "16x8", "8x32", "16x16", "32x8", "8x64", "16x32", "32x16", "64x8",
	"32x32", "32x64", "64x32", "32x128", "64x64", "128x32", "64x128", "128x64", "64x256", "128x128", "256x64",
	"64x512", "128x256", "256x128", "512x64", "64x96", "96x64", "96x128", "128x160", "160x128", "192x128",
	"128x192", "128x96", "32x256", "256x32"}

// AlgoConfig is an algorithm's tile, stages and cluster shape (cuBLASLt's
// ids).
type AlgoConfig struct{ Tile, Stages, Cluster uint32 }

func (c AlgoConfig) String() string {
	t := fmt.Sprintf("tile%d", c.Tile)
	if int(c.Tile) < len(tileNames) {
		t = tileNames[c.Tile]
	}
	return fmt.Sprintf("%s/st%d/cl%d", t, c.Stages, c.Cluster)
}

// configAttr reads one configuration attribute of algorithm a (an
// unsigned integer of at most 4 bytes) and its size in bytes.
func configAttr(a *[heuristicResultSize]byte, attr int32) (uint32, uint64, error) {
	var n uint64
	if err := checkBLAS("cublasLtMatmulAlgoConfigGetAttribute", blas.cublasLtMatmulAlgoConfigGetAttribute(unsafe.Pointer(&a[0]), attr, nil, 0, &n)); err != nil {
		return 0, 0, err
	}
	if n == 0 || n > 4 {
		return 0, 0, fmt.Errorf("%w: cuBLASLt algorithm attribute %d is %d bytes", ErrNotSupported, attr, n)
	}
	var buf [4]byte
	if err := checkBLAS("cublasLtMatmulAlgoConfigGetAttribute", blas.cublasLtMatmulAlgoConfigGetAttribute(unsafe.Pointer(&a[0]), attr, unsafe.Pointer(&buf[0]), n, &n)); err != nil {
		return 0, 0, err
	}
	return binary.LittleEndian.Uint32(buf[:]), n, nil
}

// setConfigAttr sets one configuration attribute of algorithm a to v in n
// bytes (configAttr's size).
func setConfigAttr(a *[heuristicResultSize]byte, attr int32, v uint32, n uint64) error {
	var buf [4]byte
	binary.LittleEndian.PutUint32(buf[:], v)
	return checkBLAS("cublasLtMatmulAlgoConfigSetAttribute", blas.cublasLtMatmulAlgoConfigSetAttribute(unsafe.Pointer(&a[0]), attr, unsafe.Pointer(&buf[0]), n))
}

// capIDs reads a capability of algorithm a that is an array of uint32 ids.
func capIDs(a *[heuristicResultSize]byte, attr int32) ([]uint32, error) {
	var n uint64
	if err := checkBLAS("cublasLtMatmulAlgoCapGetAttribute", blas.cublasLtMatmulAlgoCapGetAttribute(unsafe.Pointer(&a[0]), attr, nil, 0, &n)); err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, nil
	}
	ids := make([]uint32, (n+3)/4)
	if err := checkBLAS("cublasLtMatmulAlgoCapGetAttribute", blas.cublasLtMatmulAlgoCapGetAttribute(unsafe.Pointer(&a[0]), attr, unsafe.Pointer(&ids[0]), 4*uint64(len(ids)), &n)); err != nil {
		return nil, err
	}
	return ids, nil
}

// configOf is algorithm a's tile, stages and cluster shape, and the sizes
// of those three attributes.
func configOf(a *[heuristicResultSize]byte) (AlgoConfig, [3]uint64, error) {
	var c AlgoConfig
	var sz [3]uint64
	var err error
	for i, f := range []struct {
		attr int32
		v    *uint32
	}{{algoConfigTileID, &c.Tile}, {algoConfigStagesID, &c.Stages}, {algoConfigClusterID, &c.Cluster}} {
		if *f.v, sz[i], err = configAttr(a, f.attr); err != nil {
			return c, sz, err
		}
	}
	return c, sz, nil
}

// configVariants is algorithm base (a heuristic result for plan p) and
// every variant of it with another tile, cluster shape or (allStages) stage
// count among those its capabilities list that cuBLASLt accepts for p
// (cublasLtMatmulAlgoCheck) within the Matmul's workspace, base first: the
// configurations the heuristic does not offer (for the outer-vector-scaled
// FP8 product it offers one). On the context's thread (Context.Do).
func (m *Matmul) configVariants(p *gemmPlan, base *[heuristicResultSize]byte, allStages bool) ([][heuristicResultSize]byte, []AlgoConfig, error) {
	bc, sz, err := configOf(base)
	if err != nil {
		return nil, nil, err
	}
	tiles, err := capIDs(base, algoCapTileIDs)
	if err != nil {
		return nil, nil, err
	}
	stages := []uint32{bc.Stages}
	if allStages {
		if stages, err = capIDs(base, algoCapStagesIDs); err != nil {
			return nil, nil, err
		}
	}
	clusters := append([]uint32{bc.Cluster}, clusterShapes...)
	if !slices.Contains(tiles, bc.Tile) {
		tiles = append(tiles, bc.Tile)
	}
	if !slices.Contains(stages, bc.Stages) {
		stages = append(stages, bc.Stages)
	}
	algos, cfgs := [][heuristicResultSize]byte{*base}, []AlgoConfig{bc}
	seen := map[AlgoConfig]bool{bc: true}
	for _, t := range tiles {
		for _, st := range stages {
			for _, cl := range clusters {
				c := AlgoConfig{t, st, cl}
				if seen[c] {
					continue
				}
				seen[c] = true
				if res, ok := m.variant(p, base, sz, c); ok {
					algos, cfgs = append(algos, res), append(cfgs, c)
				}
			}
		}
	}
	return algos, cfgs, nil
}

// variant is algorithm base in configuration c (sz: configOf's attribute
// sizes), as a heuristic result, and whether cuBLASLt accepts it for plan
// p (cublasLtMatmulAlgoCheck) within the Matmul's workspace. On the
// context's thread.
func (m *Matmul) variant(p *gemmPlan, base *[heuristicResultSize]byte, sz [3]uint64, c AlgoConfig) ([heuristicResultSize]byte, bool) {
	a := *base
	if setConfigAttr(&a, algoConfigTileID, c.Tile, sz[0]) != nil || setConfigAttr(&a, algoConfigStagesID, c.Stages, sz[1]) != nil || setConfigAttr(&a, algoConfigClusterID, c.Cluster, sz[2]) != nil {
		return [heuristicResultSize]byte{}, false
	}
	return m.checkAlgo(p, algoOf(&a))
}

// checkAlgo is algorithm a as a heuristic result, and whether cuBLASLt
// runs it for plan p (cublasLtMatmulAlgoCheck) within the Matmul's
// workspace. On the context's thread.
func (m *Matmul) checkAlgo(p *gemmPlan, a Algo) ([heuristicResultSize]byte, bool) {
	var res [heuristicResultSize]byte
	if blas.cublasLtMatmulAlgoCheck(m.h, p.desc, p.a, p.b, p.d, p.d, unsafe.Pointer(&a[0]), unsafe.Pointer(&res[0])) != 0 {
		return res, false // this algorithm does not run this product
	}
	if binary.LittleEndian.Uint32(res[heuristicStateOffset:]) != 0 || binary.LittleEndian.Uint64(res[heuristicWorkspaceOffset:]) > uint64(m.ws.Size()) {
		return res, false
	}
	copy(res[:algoSize], a[:]) // the checked algorithm, with a heuristic result's tail
	return res, true
}

// UseScaledConfig makes configuration c of the heuristic's algorithm the
// one GemmTNScaled runs from now on for T rows x [N, K] weights into bf16
// at the Matmul's SM count target and accumulation now: what
// TuneGemmTNScaled kept, read back from a record of it (runtime/gpu's
// tuning cache). It returns the heuristic's own configuration, which it
// asks cuBLASLt for again: a record made when the heuristic chose
// differently (another cuBLASLt, say) is stale, and the caller should tune
// instead. c equal to it, or one cuBLASLt no longer accepts
// (ErrNotSupported), leaves the product to the heuristic's. inScale and
// wScale are any scale vectors (each product sets its own).
func (m *Matmul) UseScaledConfig(inScale, wScale DevicePtr, T, N, K int, c AlgoConfig) (AlgoConfig, error) {
	if T <= 0 || N <= 0 || K <= 0 || K%16 != 0 {
		return AlgoConfig{}, fmt.Errorf("%w: UseScaledConfig T=%d N=%d K=%d", ErrInvalidValue, T, N, K)
	}
	var heur AlgoConfig
	err := m.c.Do(func() error {
		p, err := m.planScaled(scaledKey(T, N, K, R16BF, m.sms, m.fast), inScale, wScale)
		if err != nil {
			return err
		}
		h, err := m.heuristic(p)
		if err != nil {
			return err
		}
		var sz [3]uint64
		if heur, sz, err = configOf(&h); err != nil {
			return err
		}
		if c == heur {
			p.algo = h
			return nil
		}
		a, ok := m.variant(p, &h, sz, c)
		if !ok {
			return fmt.Errorf("%w: cuBLASLt does not run configuration %s for T=%d N=%d K=%d", ErrNotSupported, c, T, N, K)
		}
		p.algo = a
		return nil
	})
	return heur, err
}

// TuneGemmTNScaled times cuBLASLt's scaled FP8 product (GemmTNScaled into
// bf16) at this shape (T rows, N x K weights, the Matmul's SM count target
// and accumulation now) in every configuration of the heuristic's algorithm
// configVariants finds (its own stage count), and keeps the fastest for
// the later products of that shape when it beats the heuristic's by more
// than tuneMargin. The heuristic offers one algorithm for these
// (outer-vector) scales, and its tile leaves SMs idle or waves part-full
// at 65-256 rows: on the H200 (docs/PERFORMANCE.md v0.65) o at 128 rows
// runs 8.2 us with 64x64 tiles against 14.2, down at 256 rows 24.5 against
// 37.4. Each configuration runs reps products per timed trial, three
// trials after an untimed one, their weights (and row scales) taken in
// turn from ws and wScales; in, inScale and out are scratch (inScale: T
// float32 scales, ones will do). It waits for s.
func (m *Matmul) TuneGemmTNScaled(s *Stream, out, in, inScale DevicePtr, ws, wScales []DevicePtr, T, N, K, reps int) (TuneResult, error) {
	r := TuneResult{T: T, N: N, K: K, SMs: int(m.sms)}
	if T <= 0 || N <= 0 || K <= 0 || K%16 != 0 || len(ws) == 0 || len(ws) != len(wScales) || reps <= 0 {
		return r, fmt.Errorf("%w: TuneGemmTNScaled T=%d N=%d K=%d, %d weights, %d scales, %d reps", ErrInvalidValue, T, N, K, len(ws), len(wScales), reps)
	}
	key := scaledKey(T, N, K, R16BF, m.sms, m.fast)
	var p *gemmPlan
	var algos [][heuristicResultSize]byte
	err := m.c.Do(func() error {
		var err error
		if p, err = m.planScaled(key, inScale, wScales[0]); err != nil {
			return err
		}
		// from the heuristic's choice, not the plan's algorithm: a plan
		// tuned before (another bucket's rows padded to these) starts over,
		// and Configs[0] is the heuristic's (UseScaledConfig checks it)
		h, err := m.heuristic(p)
		if err != nil {
			return err
		}
		algos, r.Configs, err = m.configVariants(p, &h, false)
		return err
	})
	if err != nil {
		return r, err
	}
	if len(algos) < 2 { // nothing to choose from
		return r, m.c.Do(func() error {
			p.algo = algos[0]
			return nil
		})
	}
	r.Us, r.Kept, err = m.keepFastest(s, p, algos, reps, func(a *[heuristicResultSize]byte, i int) error {
		j := i % len(ws)
		if err := setScales(p.desc, inScale, wScales[j]); err != nil {
			return err
		}
		return m.enqueue(s, p, a, out, in, ws[j], 1, 0)
	})
	return r, err
}

// heuristic is cuBLASLt's first choice for plan p, asked again (p's
// algorithm may be a tuned one). On the context's thread.
func (m *Matmul) heuristic(p *gemmPlan) ([heuristicResultSize]byte, error) {
	var h [heuristicResultSize]byte
	var ret int32
	if err := checkBLAS("cublasLtMatmulAlgoGetHeuristic", blas.cublasLtMatmulAlgoGetHeuristic(m.h, p.desc, p.a, p.b, p.d, p.d, m.pref, 1, unsafe.Pointer(&h[0]), &ret)); err != nil {
		return h, err
	}
	if ret == 0 {
		return h, fmt.Errorf("%w: cuBLASLt offers no algorithm for this product", ErrNotSupported)
	}
	return h, nil
}
