package cuda

import (
	"cmp"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"slices"
	"unsafe"
)

// TuneResult is what TuneGemmTN measured for one product shape: the median
// microseconds per product of each algorithm cuBLASLt's heuristic offered,
// in its order (Us[0] is the one GemmTN used before), and the index of the
// one GemmTN uses from now on.
type TuneResult struct {
	T, N, K int
	SMs     int // the SM count target the plan is for (0: every SM)
	Us      []float64
	Kept    int
	// Configs name what Us timed when they are configurations of one
	// algorithm (TuneGemmTNScaled), not the heuristic's algorithms.
	Configs []AlgoConfig
	// Heuristic and Algo are, for TuneGemmTN, cuBLASLt's first choice for
	// the product and the algorithm kept (the same when Kept is 0): what
	// UseGemmTNAlgo takes back in a later process.
	Heuristic, Algo Algo
}

// algoSize is the bytes of cublasLtMatmulAlgo_t, the head of a heuristic
// result.
const algoSize = 64

// Algo is one cuBLASLt algorithm in one configuration
// (cublasLtMatmulAlgo_t). cuBLASLt's documentation has it serialized and
// restored for use with the same cuBLASLt version: its text form is hex,
// for a tuning cache keyed by that version.
type Algo [algoSize]byte

// MarshalText is a's bytes in hex.
func (a Algo) MarshalText() ([]byte, error) { return []byte(hex.EncodeToString(a[:])), nil }

// UnmarshalText reads MarshalText's hex.
func (a *Algo) UnmarshalText(b []byte) error {
	if hex.DecodedLen(len(b)) != algoSize {
		return fmt.Errorf("%w: a cuBLASLt algorithm is %d hex digits, not %d", ErrInvalidValue, 2*algoSize, len(b))
	}
	_, err := hex.Decode(a[:], b)
	return err
}

func algoOf(h *[heuristicResultSize]byte) (a Algo) {
	copy(a[:], h[:algoSize])
	return a
}

// tuneMargin is how much faster than the heuristic's first choice another
// algorithm must be to replace it: timing noise must not swap algorithms.
const tuneMargin = 0.03

// TuneGemmTN times up to maxAlgos of the algorithms cuBLASLt's heuristic
// offers for the product GemmTN runs at this shape (T rows, N x K weights,
// beta 0, the Matmul's SM count target now) and keeps the fastest for the
// later products of that shape when it beats the first choice by more than
// tuneMargin. Each algorithm runs reps products per timed trial, three
// trials after an untimed one (its kernels load lazily), their weights
// taken in turn from ws (one per layer, say: products that read one weight
// over and over find it in L2, which no step does); in and out are
// scratch. It waits for s. The first choice is what GemmTN takes
// untuned: the heuristic ranks by its model of the card, and the sweep on
// the H200 (docs/PERFORMANCE.md v0.20) found it best at 1-32 rows and up to
// 9% slower than another at 64-256. After the heuristic's algorithms come
// its first one's other tiles and cluster shapes (configVariants): the
// heuristic never offers those, and for the FP8 product they were up to
// 1.9x faster (v0.65).
func (m *Matmul) TuneGemmTN(s *Stream, out DevicePtr, outType DataType, in DevicePtr, inType DataType, ws []DevicePtr, wType DataType, T, N, K, maxAlgos, reps int) (TuneResult, error) {
	r := TuneResult{T: T, N: N, K: K, SMs: int(m.sms)}
	if T <= 0 || N <= 0 || K <= 0 || len(ws) == 0 || maxAlgos <= 0 || reps <= 0 {
		return r, fmt.Errorf("%w: TuneGemmTN T=%d N=%d K=%d, %d weights, %d algorithms, %d reps", ErrInvalidValue, T, N, K, len(ws), maxAlgos, reps)
	}
	key := gemmKey{t: T, n: N, k: K, in: inType, w: wType, out: outType, beta0: true, sms: m.sms, fast: m.fastFor(inType, wType)}
	var p *gemmPlan
	var algos [][heuristicResultSize]byte
	err := m.c.Do(func() error {
		var err error
		if p, err = m.plan(key); err != nil {
			return err
		}
		if algos, err = m.candidates(p, maxAlgos); err != nil || len(algos) == 0 {
			return err
		}
		// a configuration cuBLASLt cannot describe leaves the heuristic's list as it is
		if vs, _, verr := m.configVariants(p, &algos[0], false); verr == nil {
			algos = append(algos, vs[1:]...)
		}
		return nil
	})
	if err != nil {
		return r, err
	}
	if len(algos) < 2 { // nothing to choose from
		if len(algos) == 1 {
			r.Heuristic, r.Algo = algoOf(&algos[0]), algoOf(&algos[0])
		}
		return r, nil
	}
	r.Us, r.Kept, err = m.keepFastest(s, p, algos, reps, func(a *[heuristicResultSize]byte, i int) error {
		return m.enqueue(s, p, a, out, in, ws[i%len(ws)], 1, 0)
	})
	if err != nil {
		return r, err
	}
	r.Algo = algoOf(&algos[r.Kept])
	err = m.c.Do(func() error {
		h, err := m.heuristic(p)
		r.Heuristic = algoOf(&h)
		return err
	})
	return r, err
}

// UseGemmTNAlgo makes algorithm a the one GemmTN runs from now on for T
// rows x [N, K] weights of these types (beta 0) at the Matmul's SM count
// target: what TuneGemmTN kept (TuneResult.Algo), read back from a record
// of it (runtime/gpu's tuning cache). It returns cuBLASLt's first choice
// for the product, asked again: a record made when the heuristic chose
// otherwise (another cuBLASLt, say) is stale, and the caller should tune
// instead. a equal to it runs as the heuristic's; one cuBLASLt does not
// run for this product within the workspace (cublasLtMatmulAlgoCheck)
// leaves the product as it was and is ErrNotSupported.
func (m *Matmul) UseGemmTNAlgo(outType, inType, wType DataType, T, N, K int, a Algo) (Algo, error) {
	if T <= 0 || N <= 0 || K <= 0 {
		return Algo{}, fmt.Errorf("%w: UseGemmTNAlgo T=%d N=%d K=%d", ErrInvalidValue, T, N, K)
	}
	var heur Algo
	err := m.c.Do(func() error {
		p, err := m.plan(gemmKey{t: T, n: N, k: K, in: inType, w: wType, out: outType, beta0: true, sms: m.sms, fast: m.fastFor(inType, wType)})
		if err != nil {
			return err
		}
		h, err := m.heuristic(p)
		if err != nil {
			return err
		}
		if heur = algoOf(&h); a == heur {
			p.algo = h
			return nil
		}
		res, ok := m.checkAlgo(p, a)
		if !ok {
			return fmt.Errorf("%w: cuBLASLt does not run the recorded algorithm for T=%d N=%d K=%d", ErrNotSupported, T, N, K)
		}
		p.algo = res
		return nil
	})
	return heur, err
}

// keepFastest times each of algos for plan p, reps products (run, on the
// context's thread, with the product's index) per trial, and makes the
// fastest p's algorithm when it beats algos[0] by more than tuneMargin,
// else algos[0]: the microseconds a product of each, and the one kept. Up to
// screenKeep+1 algorithms each get one untimed trial (their kernels load
// lazily) and three timed. More are screened first, one untimed trial and
// one timed each, and only algos[0] and the screenKeep fastest are timed
// three times more (their Us are those; the others' the screening's): the
// FP8 tuning's 400-500 configurations a product took ~55 s for the 8B
// model's 48 products with four trials each.
func (m *Matmul) keepFastest(s *Stream, p *gemmPlan, algos [][heuristicResultSize]byte, reps int, run func(a *[heuristicResultSize]byte, i int) error) ([]float64, int, error) {
	timed := func(ai, warm, trials int) (float64, error) {
		a := &algos[ai]
		ms, err := s.MedianMs(warm, trials, func(trial int) error {
			for i := range reps {
				if err := m.c.Do(func() error { return run(a, trial*reps+i) }); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return 0, fmt.Errorf("algorithm %d of %d: %w", ai, len(algos), err)
		}
		return ms * 1000 / float64(reps), nil
	}
	us := make([]float64, len(algos))
	finalists := make([]int, len(algos))
	for i := range finalists {
		finalists[i] = i
	}
	warm := 1
	if len(algos) > screenKeep+1 {
		for ai := range algos {
			u, err := timed(ai, 1, 1)
			if err != nil {
				return nil, 0, err
			}
			us[ai] = u
		}
		rest := finalists[1:]
		slices.SortStableFunc(rest, func(a, b int) int { return cmp.Compare(us[a], us[b]) })
		finalists, warm = finalists[:screenKeep+1], 0 // algos[0] and the screenKeep fastest, their kernels loaded
	}
	for _, ai := range finalists {
		u, err := timed(ai, warm, 3)
		if err != nil {
			return nil, 0, err
		}
		us[ai] = u
	}
	best := 0
	for _, i := range finalists {
		if us[i] < us[best] {
			best = i
		}
	}
	if us[best] >= us[0]*(1-tuneMargin) {
		best = 0
	}
	return us, best, m.c.Do(func() error {
		p.algo = algos[best] // algos[0] too: a plan tuned before starts over
		return nil
	})
}

// screenKeep is how many of the screened algorithms keepFastest times
// again, besides the heuristic's.
const screenKeep = 8

// candidates is up to n of the algorithms cuBLASLt's heuristic offers for
// plan p, in its order, those it reports it cannot run left out. On the
// context's thread (Context.Do).
func (m *Matmul) candidates(p *gemmPlan, n int) ([][heuristicResultSize]byte, error) {
	res := make([]byte, n*heuristicResultSize)
	var ret int32
	if err := checkBLAS("cublasLtMatmulAlgoGetHeuristic", blas.cublasLtMatmulAlgoGetHeuristic(m.h, p.desc, p.a, p.b, p.d, p.d, m.pref, int32(n), unsafe.Pointer(&res[0]), &ret)); err != nil {
		return nil, err
	}
	var algos [][heuristicResultSize]byte
	for i := range int(ret) {
		h := res[i*heuristicResultSize : (i+1)*heuristicResultSize]
		if binary.LittleEndian.Uint32(h[heuristicStateOffset:]) != 0 { // not CUBLAS_STATUS_SUCCESS
			continue
		}
		var a [heuristicResultSize]byte
		copy(a[:], h)
		algos = append(algos, a)
	}
	return algos, nil
}

// heuristicStateOffset is where cublasLtMatmulHeuristicResult_t keeps its
// state (a cublasStatus_t): after the 64-byte algorithm and the workspace
// size, before the waves count.
const heuristicStateOffset = 72
