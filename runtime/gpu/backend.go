// Package gpu is the CUDA backend of the engine: bf16 weights and
// activations with float32 arithmetic, a paged bf16 KV cache, cuBLASLt GEMMs,
// NVRTC-compiled kernels (package kernels) and segmented LoRA (SGMV) over
// per-slot adapter weights. Everything runs on one stream of one device,
// driven from one goroutine (the engine's); CUDA calls hop to the context's
// locked executor thread, once per step when the engine wraps the step in
// Backend.Run (engine.Runner).
package gpu

import (
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"errors"
	"fmt"

	"github.com/peftd/peftd/kernels"
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/safetensors"
)

// ErrBadStep marks step metadata the backend refuses (it would index outside its buffers).
var ErrBadStep = errors.New("gpu: bad step metadata")

// Available reports whether a usable GPU is present: nil when the driver,
// a device, NVRTC and cuBLASLt all load; otherwise an error wrapping
// cuda.ErrNoDriver, cuda.ErrNoDevice or cuda.ErrNoLibrary.
func Available() error {
	if err := cuda.Init(); err != nil {
		return err
	}
	if _, _, err := cuda.NVRTCVersion(); err != nil {
		return err
	}
	if _, err := cuda.CublasLtVersion(); err != nil {
		return err
	}
	return nil
}

// Options configure New.
type Options struct {
	Device         int             // CUDA device ordinal
	Kernels        kernels.Options // kernel cache and NVRTC options
	WorkspaceBytes int             // cuBLASLt workspace; default 32 MiB
	// WeightFormat is the format of the decoder layers' projection weights:
	// WeightsBF16 ("" too) or WeightsFP8 (e4m3 with per-output-row scales,
	// activations quantized per token; see fp8.go).
	WeightFormat string
	// KVFormat is the KV cache's format: KVBF16 ("" too) or KVFP8 (keys in
	// e4m3 with a scale per token and KV head, values in bf16).
	KVFormat string
	// Eager runs every step op by op: no CUDA graphs for decode steps.
	Eager bool
	// SerialLoRA runs each LoRA update on the compute stream after its
	// projection. By default it runs on a second (high-priority) stream
	// beside the projection's GEMM and the op that next reads the
	// projection's output adds it (lora.go).
	SerialLoRA bool
	// LoRASMs is how many multiprocessors the GEMMs of a step with LoRA
	// leave to the LoRA stream (cuBLASLt's SM count target): 0 chooses by
	// the step's rows (autoLoRASMs); negative holds none back (the LoRA
	// blocks then take SMs as the GEMM's blocks free them).
	LoRASMs int
	// GraphRows is the largest step (rows) recorded as a CUDA graph, rounded
	// down to a bucket (graphBuckets: ..., 256, 384, 512) and to the
	// engine's MaxTokens; larger steps run their ops eagerly, cannot be
	// chained, and run their LoRA updates on the compute stream. 0: 256.
	// Serving steps that carry new prompts often pass 256 rows; up to 512
	// is an experiment (docs/PERFORMANCE.md v0.26).
	GraphRows int
	// RecordIdle leaves every CUDA graph recording to Warmup (the
	// engine's WarmSome, which the scheduler calls while it has no step to
	// run: --warm-graphs idle): a step whose recording is missing runs its
	// ops eagerly in the recording's layout, instead of recording it on the
	// request's time, and MissedRecording reports it.
	RecordIdle bool
	// PinnedImageBytes is the pinned host memory kept for adapter images
	// (pinned.go): an adapter that comes back to the device from host
	// memory then uploads by DMA alone. 0: DefaultPinnedImageBytes;
	// negative: none (every upload fills the staging ring).
	PinnedImageBytes int64
	// NoPDL launches the compute stream's kernels one after the other. By
	// default, where the driver and GPU allow it (sm_90+), they launch with
	// Programmatic Dependent Launch: a kernel's blocks are scheduled while
	// the one before it finishes (each waits for it first thing), in
	// eager steps and in recorded graphs alike.
	NoPDL bool
	// TuneGEMMs times, before the first graphs are recorded, the
	// algorithms cuBLASLt offers for the bf16 projections at the graph
	// buckets of tuneMinRows rows and more, and the first one's other tiles
	// and cluster shapes (tune.go, cuda.Matmul.TuneGemmTN), and keeps the
	// fastest of each. Off by default: on an H200 the decode steps ran
	// within 1% of cuBLASLt's first choices (docs/PERFORMANCE.md v0.21,
	// before the tiles were tried).
	// With FP8 weights it tunes the FP8 products of 65 rows and more
	// instead, as TuneFP8 does.
	TuneGEMMs bool
	// TuneBF16 tunes, with bf16 weights, the products cuBLASLt runs beside
	// the LoRA stream in decode steps (tuneMinRows to wsMaxRows rows, at
	// the SMs the stream leaves; gemm_ws takes the others) as TuneGEMMs
	// does. On an H200 the 64-row steps with four rank-32 adapters ran
	// 1.5% faster (6.48 -> 6.38 ms; o at 116 SMs 17.0 -> 14.3 µs; with
	// every product tuned, TuneGEMMs, 6.33 -> 6.21), 48-row ones within
	// noise (5.99 -> 6.03); the whole TuneGEMMs moved serving within 1%,
	// the steps of 128-256 rows beside the stream slower
	// (docs/PERFORMANCE.md v0.70). It also tunes the products of more
	// than wsMaxRows rows on the whole card, where the base steps run them
	// (bf16Default; v0.91: an H100's base mixed steps 1% faster). Under 85 s
	// for the 8B model (every bf16 product tuned: 84 s on an H100), once
	// with TuneCacheDir. Off in the zero Options (tests); peftd serve turns
	// it on.
	TuneBF16 bool
	// TuneFP8 tunes, with FP8 weights, the FP8 products of 65 rows and
	// more before the first graphs are recorded: every tile and cluster
	// shape of cuBLASLt's one scaled algorithm, and the K split against
	// the tuned whole product (tune.go's tuneFP8). On an H200 the 8B
	// model's steps of 128 and 256 rows ran 4% and 3% faster, serving
	// 2.5-3% more tokens a second (docs/PERFORMANCE.md v0.66); it takes
	// ~20 s, once with TuneCacheDir (then 0.05 s). Off in the zero
	// Options (tests); peftd serve turns it on.
	TuneFP8 bool
	// TuneFP8From is the fewest rows whose FP8 products TuneFP8 (or
	// TuneGEMMs) tunes; 0: wsMaxRows+1 (65), the rows cuBLASLt takes.
	// Below 65 each product's route as it runs (fp8_stream, fp8_ws,
	// fp8_wg, or cuBLASLt padded or split) is timed against cuBLASLt's
	// scaled product tuned at those rows, which replaces it where 3%
	// faster (fp8State.ltRows): isolated on an H200, cuBLASLt's best
	// configurations at 64 rows ran o in 8.1 µs, q/k/v 10.2, gate/up
	// 32.8, against 10.4 / 13.3 / 35.7 for fp8_ws in a step's trace
	// (PERFORMANCE v0.66). In steps (v0.67) cuBLASLt took 1 product of
	// 68 and the 16-64-row steps moved at most 1.5%: 0 by default.
	TuneFP8From int
	// TuneCacheDir keeps what TuneFP8, TuneBF16 or TuneGEMMs decided, one
	// file per weight format, card, driver, cuBLASLt (FP8: accumulation
	// and routes too; tunecache.go): a later start reads each product's
	// record instead of timing it. "": no cache.
	TuneCacheDir string
	// LoRAPartition, when positive, splits the SMs by green contexts
	// (partition.go): at least that many (the driver rounds up: 8 SMs a
	// unit on Hopper, at most half of them) run the LoRA stream, the
	// others the compute stream, for every step. 0: no partition; steps
	// with adapters hint cuBLASLt to leave LoRASMs free instead.
	LoRAPartition int
	// ChainSteps lets a step be launched behind the one in flight
	// (engine.Chainer, chain.go): its decode rows read the tokens that
	// step draws on the device, so the device never waits for the host
	// between two graph-replayed steps. `peftd serve` sets it unless
	// --chain-steps=false (serving +0.5-2.6% on an H200, docs/PERFORMANCE.md
	// v0.21); the zero Options keep steps unchained.
	ChainSteps bool
	// NoFP8Wgmma keeps every FP8 product of 17-64 rows on cuBLASLt. By
	// default (FP8 weights on sm_90a) the FP8 module is built with the
	// wgmma products (PEFTD_WG: the module's other kernels compile to the
	// same SASS) and wgAutoFits' products run on them (fp8_wg):
	// docs/PERFORMANCE.md v0.31, decode -4.6% at 32 rows, -4.9% with four
	// adapters at 64, serving with adapters +1.2%.
	NoFP8Wgmma bool
	// NoWS keeps products of 17-64 rows off the ws kernels (ws.go). By
	// default on sm_90a FP8 products take fp8_ws (with the FP8 module's
	// wgmma build, so not with NoFP8Wgmma; docs/PERFORMANCE.md
	// v0.56-v0.63), and bf16 products that no LoRA update runs beside, or
	// of at most 32 rows, take gemm_ws (the forward module's
	// kernels.BF16Wgmma build; v0.68: bf16 decode at 32 / 64 rows -4%;
	// v0.69: -3% with four adapters at 24 / 32 rows).
	NoWS bool
	// FP8PreciseAccum has cuBLASLt's FP8 products (the steps of 65 rows
	// and more, and some of 17-64 beside the LoRA stream) promote their
	// partial sums to float32 every few K steps. By default they
	// accumulate as the tensor cores do (CUBLASLT_MATMUL_DESC_FAST_ACCUM),
	// as peftd's own FP8 kernels always do: gate/up 9-10% faster at
	// 128-256 rows, with the scheme's fidelity and the trained model's KL
	// unchanged (docs/PERFORMANCE.md v0.64-v0.65). An A/B.
	FP8PreciseAccum bool
}

// WSProducts reports whether FP8 products of 17-64 rows with no LoRA
// update beside run on fp8_ws: FP8 weights on sm_90a, the wgmma
// build loaded and Options.NoWS unset.
func (b *Backend) WSProducts() bool { return b.f8 != nil && b.f8.wsAuto }

// FP8Wgmma reports whether FP8 products of 17-64 rows run on the wgmma
// kernels: FP8 weights, the wgmma products loaded (sm_90a) and
// Options.NoFP8Wgmma unset.
func (b *Backend) FP8Wgmma() bool { return b.f8 != nil && b.f8.wgAuto }

// autoLoRASMs is the SMs a step of rows rows with adapters leaves to the
// LoRA stream when Options.LoRASMs is 0. Measured on the H200 (132 SMs),
// decode with four rank-32 adapters: up to gemm_skinny's 16 rows none (its
// one-wave grids leave room on every SM for the LoRA stream's blocks beside
// them; v0.33 with programmatic joins: 8 rows 5.15 vs 5.28 ms holding 16,
// 16 rows 5.27 vs 5.38; v0.13 at batch 1: 5.32 vs 5.43-5.47); above it 16
// (cuBLASLt's products fill the SMs they are given): 16 ties 32 at 64 and
// 128 rows (6.84 vs 6.80, 8.46 vs 8.43) and beats it at 256 (13.03 vs
// 13.71; none: 13.89; v0.31).
func autoLoRASMs(rows int) int {
	if rows <= bfSkinnyMaxRows {
		return 0
	}
	return 16
}

// Buffer is a device activation matrix [rows, cols], bf16 (or float32 once
// Logits has written it); a view (NewView) is columns [off, off+cols) of
// another buffer's rows, ld values apart.
type Buffer struct {
	mem        *cuda.DeviceBuffer // bf16
	f32        *cuda.DeviceBuffer // float32 storage, allocated by Logits
	isF32      bool
	rows, cols int
	off, ld    int // first column and row stride, in values
}

// whole reports whether the buffer is not a view (its rows are contiguous).
func (x *Buffer) whole() bool { return x.off == 0 && x.ld == x.cols }

// Cols is the row width.
func (b *Buffer) Cols() int { return b.cols }

type weight struct {
	mem        *cuda.DeviceBuffer
	rows, cols int
	proj       bool // a decoder layer's projection (llama.FP8Projection's names): Options.TuneGEMMs tunes its products
}

type slotState struct {
	mem     *cuda.DeviceBuffer
	maxRank int
	odd     bool         // some rank is not a multiple of 8 (no tensor-core expand)
	pin     *pinnedImage // the kept host image it was uploaded from (nil: none)
}

type funcs struct {
	embed, addRMSNorm, addRMSNormCl, rmsnormRows, ropeStore, attention, siluMul, siluMulO2, siluMulCl, siluMulH, siluMulO2H, siluMulClH, shrink, expand *cuda.Function
	addBias, headRMSNorm, addDelta, addDeltaH, addRMSNormH, fillRows, loraCat, kcatSelectSplit                                                          *cuda.Function
	sgShrink, sgShrink4, sgShrink64, sgShrink64P, sgExpand, sample, logitAdjust                                                                         *cuda.Function
	attnDecode                                                                                                                                          [4]*cuda.Function // attn_decode_d32, d64, d128, d256
	attnDecode8                                                                                                                                         [4]*cuda.Function // attn_decode8_d*: FP8 keys
	attnDecode2                                                                                                                                         [4]*cuda.Function // attn_decode2_d*: 2 warps a block (decV2)
	attnDecodeW8                                                                                                                                        [3]*cuda.Function // attn_decode_w8_d32, d64, d128: 8 warps a block (decV8)
	attnDecode8W2                                                                                                                                       [4]*cuda.Function // attn_decode8_w2_d*: FP8 keys, 2 warps a block (decV2)
	attnDecode8W8                                                                                                                                       [3]*cuda.Function // attn_decode8_w8_d32, d64, d128: FP8 keys, 8 warps a block (decV8)
	attnPrefill                                                                                                                                         [3]*cuda.Function // attn_prefill_d32, d64, d128
	attnPrefill8                                                                                                                                        [3]*cuda.Function // attn_prefill8_d*: FP8 keys
	sgExpandTC                                                                                                                                          [3]*cuda.Function // sgmv_expand_tc1, tc2, tc4
	sgExpandTCH                                                                                                                                         [3]*cuda.Function // sgmv_expand_tch1, tch2, tch4 (the update as bf16: guHalf)
	sgExpandTC64S                                                                                                                                       *cuda.Function    // sgmv_expand_tc64s (kernelForce.stageOut)
	sgExpandTCHS                                                                                                                                        *cuda.Function    // sgmv_expand_tch1s (kernelForce.halfStage)
	ropeRows, ropeRowsH, ropeStoreH                                                                                                                     *cuda.Function    // rope_store_rows, and with bf16 updates (qkvHalf) rope_store_rows_h and rope_store_h
	ropeLoRA                                                                                                                                            *cuda.Function    // rope_store_lora
}

// forced is an int setting of kernelForce whose 0 means the default and
// -1 none: def for 0, 0 for a negative f, else f.
func forced(f, def int) int {
	switch {
	case f < 0:
		return 0
	case f > 0:
		return f
	}
	return def
}

// forcedOn is a kernelForce switch: on for a positive f, off for a
// negative one, def for 0.
func forcedOn(f int, def bool) bool {
	if f != 0 {
		return f > 0
	}
	return def
}

// kernelForce makes the steps of a Backend take one kernel family where the
// Backend otherwise chooses by shape: the tests check every family against
// the reference and the benchmarks compare them. Production never sets it.
type kernelForce struct {
	wsHalf16   bool          // the half-row products of 1-16 rows (FP8 gate/up) on fp8_wsh16_n* (16 activation rows staged), not fp8_wsh_n*
	wsLong16   bool          // ws plans of 1-16 rows on the 16-row kernels keep narrow blocks over long K (wsShortRows waived: FP8 down n32x1, not n64x2)
	ws16       int           // FP8 ws products of 1-16 rows on the 16-row kernels (fp8_ws16_n*: 16 activation rows staged, WS16_KA atoms a stage) where loaded (1), -1 never (0: ws16Auto)
	wsHalf     int           // ws products of widths 224 and 256 (gate/up): the half-row kernels (gemm_wsh, fp8_wsh) where loaded (1), -1 never (0: wsHalfAuto for bf16, off; wsHalfFP8Auto for FP8, on)
	wsSiLU     int           // bf16 gate/up products gemm_ws takes in base steps: with silu_mul in the same launch (silu_ws.go) where it fits (1), -1 never (0: wsSiLUAuto: bf16 on, FP8 off)
	wsNorm     int           // o and down products a ws kernel takes in base steps: with the add_rmsnorm after them in the same launch (norm_ws.go) where it fits (1), -1 never (0: wsNormAuto, off)
	bws        int           // bf16 products of 17-64 rows on gemm_ws (ws.go) where it plans: 1 every product, 2 the narrow ones (wsNarrow), 3 every product no LoRA update runs beside, 4 those and every product of at most bwsBesideRows rows, -1 none (0: Backend.bwsAuto's choice, 4 or none)
	loraRows   bool          // LoRA: the row-at-a-time kernels (lora_shrink, lora_expand)
	loraV1     bool          // LoRA: SGMV v1 (sgmv_shrink, then an expand launch)
	loraV2     bool          // LoRA: SGMV v2 (one launch per op) wherever it fits
	holds      [4]int        // LoRA beside each fused group's product (llama.FusedGroups' order): hold this many SMs back from it (0: holdFor's choice; negative: none)
	pdlJoins   int           // recordings' programmatic joins: mode 1, 2 or 3 (pdljoin.go's joinMode; 0: the default, 2; -1: none)
	attnRows   bool          // attention: the per-row kernel for every row (no attn_decode, attn_prefill, graphs)
	decSplit   int           // attn_decode: this many KV splits per (sequence, KV head), at most decSplitFor's cap (0: decSplitFor's choice)
	ropeHeads  bool          // RoPE and the K/V store: rope_store (a block per row and head) for every shape
	decOpts    int           // attn_decode's opts (llama.cu) in place of decOptsDefault (0: the default; -1: none): 1 the first tiles before griddepcontrol.wait, 2 the merge with 16 loads in flight, 4 the splits as clusters (decCluster), 16 head-major blocks, 32 no wait before the tiles right after attn_prefill (decOptLate)
	decVar     int           // attn_decode's variant whatever the rows: 1 + a decVariant (0: decVariantFor's choice)
	noSkinny   bool          // bf16 products: cuBLASLt whatever the rows (no gemm_skinny)
	skLate     bool          // gemm_skinny: no weight tiles before griddepcontrol.wait (opts 0)
	wgFull     bool          // wgmma products beside the LoRA stream: a grid over every SM, not the SM target (v0.32's)
	loraKChunk int           // LoRA shrinks: K split into pieces of about this many columns (0: fp8KChunk in FP8 steps of fp8KChunkRows, fp8KChunkBig in those of more than fp8KChunkBigAbove, else enough blocks to cover the SMs twice; -1: the latter always)
	loraInline int           // fused groups (bit g: llama.FusedGroups[g]) whose shrink runs inside gemm_skinny (lora_inline.go; 0: the default, q/k/v; -1: none)
	serialLoRA int           // fused groups (bit g) whose update runs after the product on the compute stream, added in place, with no SMs held from the product (Backend.serialGroup; 0 or -1: none, the default)
	wholeLoad  bool          // adapter loads: a step waits for the whole image before it starts (no per-layer start)
	slowFill   time.Duration // adapter loads: a sleep after each chunk's fill (tests: a step must wait for the host)
	ropeLoRA   int           // q/k/v LoRA expanded inside RoPE at 1-16 rows (lora_rope.go): 1 on, -1 off, 0 by the rows (ropeFold)
	siluO2     int           // FP8 silu_mul of more than siluClRows rows (one 512-thread block a row) as silu_mul_o2 (64 registers a thread: two blocks an SM): 1 on, -1 off, 0 the default (above fp8MidRows rows; Backend.siluMulFn)
	qkvHalf    int           // the q/k/v LoRA update beside its product written as bf16 (sgmv_expand_tch*, accHalf) and read by rope_store_rows_h / rope_store_h (Backend.halfUpdate): 1 on, -1 off, 0 the default (qkvHalfAuto)
	outHalf    int           // the o and down LoRA updates beside their products written as bf16 (sgmv_expand_tch*, accHalf) and read by add_rmsnorm_h (Backend.halfUpdate): 1 on (add_rmsnorm_h stands in for add_rmsnorm_cl at 1-16 rows), -1 off, 0 the default (outHalfAuto with FP8 weights, off with bf16)
	guHalf     int           // the gate/up LoRA update beside its product written as bf16 (sgmv_expand_tch*, accHalf) and read by silu_mul_h / _o2h / _clh (Backend.halfUpdate): 1 on, -1 off, 0 the default (guHalfAuto)
	siluCl     int           // FP8 silu_mul of 1-64 rows: 1 silu_mul_cl (a cluster of blocks a row) wherever it fits, -1 never, 0 by the rows (siluClFits)
	nodePrio   int           // recordings run the LoRA stream's kernels at that stream's priority (graph.go nodePriority): 1 at every row count, -1 at none, 0 by the rows
	memHoist   int           // recordings and cuBLASLt's memsets (memsethoist.go): -1 as captured, 1 moved beside the kernel before them, 0 moved and replaced by fill_rows
	attnTS     bool          // attn_decode gets part with one split too (TestDecodeBench's PEFTD_ATTN_TS: the PEFTD_ATTN_TS build's timestamps)
	allLogits  bool          // mixed recordings compute every row's logits, as before v0.90 (no few-logits recordings: logitCaps)
	addCl      int           // add_rmsnorm as add_rmsnorm_cl (a cluster of blocks a row; norm_cl.go): 1 wherever it fits, -1 never, 0 by the rows and update (addClFits)
	shrink64   int           // LoRA shrinks as sgmv_shrink64 (64-row tiles): 1 always, -1 never, 0 from sgBigMinRows LoRA rows
	shrinkPipe int           // those shrinks as sgmv_shrink64p (each lane's loads through its own cp.async ring in shared memory; the same bits) where the card has the shared memory (sbpFits): 1 always, -1 never, 0 where shrinkPipeAuto
	halfStage  int           // rank-32-class expands writing a bf16 update (accHalf) as sgmv_expand_tch1s (the output tile staged in shared memory, out in 16-byte pieces of whole rows; tch1's bits) where the rows are 16-byte aligned: 1 on, -1 off, 0 the default (from halfStageMinRows LoRA rows where halfStageAuto, on)
	stageOut   int           // rank-32-class expands adding in place as sgmv_expand_tc64s (the output tile staged in shared memory: 16-byte whole-row loads and stores, not 4-byte ones in the MMA fragment's layout; the same bits): 1 always, -1 never, 0 from stageOutMinRows LoRA rows where stageOutAuto (on)
	oNoPDL     int           // the o group's LoRA kernels launched without PDL (loraAside: its expand's blocks, placed early under the shrink, would take the SMs the o product launching after them needs): 1 on, -1 off, 0 the default (FP8 steps above fp8MidRows rows; Backend.oNoPDL)
	l2Win      int           // the LoRA update buffer as an L2 persisting window (l2win.go): 1 on, -1 off, 0 the default (loraL2Default, PEFTD_LORA_L2); 3 on over the whole buffer, not loraL2Bytes of it (an A/B)
}

// Backend implements engine.Backend on one CUDA device.
type Backend struct {
	ctx *cuda.Context
	s   *cuda.Stream
	mm  *cuda.Matmul
	mod *cuda.Module
	sk  *bfSkinny  // the bf16 products of decode steps (nil: cuBLASLt's)
	bws *wsProduct // gemm_ws (ws_body on bf16; kernels.BF16Wgmma, PEFTD_WS or PEFTD_WG, sm_90a) for 17-64 rows (nil: not compiled in)
	// bwsAuto: bf16 weights and gemm_ws loaded (Options.NoWS unset): the
	// products of 17-64 rows take it as bwsMode 4 says
	bwsAuto bool
	// fused counts the fused ops' launches enqueued or recorded
	// (LinearSiLU, LinearAddRMSNorm: tests see that a step took them)
	fused struct{ silu, norm int }
	// guHalfOn is guHalf's default (guHalfDefault, read by New);
	// hugeHoldsOff: FP8 steps above fp8HugeRows rows hold autoBigHoldsFP8,
	// not autoHugeHoldsFP8 (PEFTD_LORA_FP8_HUGE_HOLDS=off, read by New)
	guHalfOn, hugeHoldsOff bool
	// outHalfOn and qkvHalfOn are outHalf's and qkvHalf's defaults
	// (outHalfDefault, qkvHalfDefault; read by New)
	outHalfOn, qkvHalfOn bool
	// ws16On is the 16-row ws kernels' default (ws16Default, read by New;
	// kernelForce.ws16 overrides it)
	ws16On bool
	// expandStageds, halfStageds, shrinkBigs, shrinkPipes, siluHalfs,
	// normHalfs and ropeHalfs count the sgmv_expand_tc64s,
	// sgmv_expand_tch1s, sgmv_shrink64, sgmv_shrink64p, silu_mul_*h,
	// add_rmsnorm_h and rope_store*_h launches enqueued or recorded (tests)
	expandStageds, halfStageds, shrinkBigs, shrinkPipes, siluHalfs, normHalfs, ropeHalfs int
	// sbpFits: a block may have sgmv_shrink64p's shared memory (sbpShared)
	sbpFits bool
	fn      funcs
	// KernelInfo tells whether the kernels were compiled or read from the cache.
	KernelInfo kernels.Info

	cfg    *llama.Config
	kv     engine.KVSpec
	maxT   int
	kcache *cuda.DeviceBuffer
	vcache *cuda.DeviceBuffer
	layerB int // bytes of one layer's V cache (and K cache, in bf16)
	// an FP8 key cache (Options.KVFormat): kcache holds e4m3 keys, layerKB
	// bytes a layer, and kscale their float32 scales, layerSB bytes a layer
	// (where each one sits: kscaleAt)
	kv8 bool
	// life orders PrepareAdapter (any goroutine) before Close: closed is
	// set under it, and PrepareAdapter reads it under it
	life             sync.RWMutex
	closed           bool
	kscale           *cuda.DeviceBuffer
	layerKB, layerSB int

	meta     *engine.StepMeta
	metaHost *cuda.HostBuffer
	metaDev  *cuda.DeviceBuffer

	// The step's launch parameters, set by Begin (eager, the metadata in
	// metaDev) or fillGraphMeta (graph layout, padded to a bucket): the ops
	// read nothing else of the step.
	off           metaOffsets
	metaBase      cuda.DevicePtr // device address of the metadata words
	nRows         int            // rows the ops run over
	nLogit        int            // logits rows
	nLora         int            // LoRA rows (v0 kernels)
	stepRank      int            // LoRA rank the launches are sized for (0: no LoRA)
	stepTmp       cuda.DevicePtr // LoRA scratch and its size in floats
	stepTmpFloats int
	part          *cuda.DeviceBuffer // attn_decode partials
	// xtsBuild: the kernels are a PEFTD_EXPAND_TS build (every tensor-core
	// expand takes the stamps' pointer; New reads it); expandTS, where set
	// (TestDecodeBench's PEFTD_EXPAND_TS), is where the gate/up group's
	// expand writes them (xtsBlocks blocks of xtsWords words)
	xtsBuild    bool
	expandTS    *cuda.DeviceBuffer
	graphLayout bool // the fixed-layout launches (graph.go)
	g           graphState

	invFreqHost []float32
	invFreq     *cuda.DeviceBuffer
	normed      *cuda.DeviceBuffer
	readHost    *cuda.HostBuffer
	// SampleRows / IssueSample: parameters, then results; two sets, in
	// turn, when steps chain (two draws may be in flight)
	smp  [2]smpBuf
	smpi int

	force kernelForce // zero in production; tests and benchmarks compare kernel families with it

	slots       []*slotState
	table       *cuda.DeviceBuffer
	tableHost   []uint64 // 4 words per entry: a, b, rank|scale<<32, 0
	loraTmp     *cuda.DeviceBuffer
	maxRank     int
	oddRank     bool // a loaded adapter has a rank that is not a multiple of 8
	nTiles      int  // SGMV row tiles of the step
	nBig        int  // sgmv_shrink64's tiles of the step (up to sgBigRows rows of one adapter)
	expandShmem int  // dynamic shared memory sgmv_expand may use (raised on demand)
	// SGMV v2 (kernels/sgmv.cu, shrink + expand in one launch per op), loaded
	// with the first adapter; nil when that module failed to build or load
	// (sgErr), and then v1 runs; v2 runs where tiles average >= sgV2MinRows
	// rows.
	sgMod      *cuda.Module
	sgLoad     chan sgLoaded     // the module New started loading (compiling on a cold cache); nil once taken
	sgFused    [2]*cuda.Function // 8 and 32 rank rows per shrink item
	sgErr      error
	sgTried    bool
	fusedShmem int

	// Split-KV decode attention (attn_decode) for sequences
	// with one row in the step; the per-row kernel takes the other rows.
	decOK       bool             // the model's head shape suits attn_decode (head_dim 32, 64, 128 or 256; <= 8 query heads per KV head)
	decResident [decVariants]int // attn_decode blocks of each variant resident at once (sizeDecode)
	decV        decVariant       // the step's attn_decode variant (decVariantFor of its bucket, set with decSplit)
	preOK       bool             // the head shape suits attn_prefill (head_dim 32, 64 or 128)
	// the attn_decode and attn_prefill variants (head_dim 32 << i) whose
	// shared memory fits a block on this card
	decFit           [4]bool
	decW8Fit         [4]bool // attn_decode_w8 runs at this head dimension (w8Fits)
	preFit           [3]bool
	pdl              bool      // the compute stream launches kernels programmatically (Options.NoPDL)
	ropeLoRALaunches int       // rope_store_lora launches recorded or run (lora_rope.go; tests)
	addClUpdates     int       // add_rmsnorm_cl launches that added a LoRA update (norm_cl.go; tests)
	tune             tuneState // Options.TuneGEMMs (tune.go)
	nDec, nPre       int       // decode sequences and prefill rows of the step
	nPreTiles        int       // attn_prefill tiles of the step (0: the per-row kernel takes the prefill rows)
	decSplit         int       // splits per (sequence, KV head)
	attnPart         *cuda.DeviceBuffer
	attnDone         *cuda.DeviceBuffer // attn_decode's per-(row, KV head) split counters

	stage *staging // weight uploads' pinned staging (upload.go), freed before the first step

	la        loraAside    // the LoRA stream and the update it has in flight (lora.go)
	l2Aside   int          // bytes of L2 set aside for the update buffer's window (l2win.go; the streams launch with a window of as many bytes)
	l2Refused bool         // the card or driver refused the window: it stays off
	smPart    *smPartition // Options.LoRAPartition (nil: none)
	ctxFree   bool         // the kernels were loaded as context-independent libraries (kernels.Options.ContextFree)

	// asynchronous adapter loads (PrepareAdapter / LoadPrepared)
	cs          *cuda.Stream   // copy stream (weight uploads)
	up          *cuda.Uploader // adapter images, through pinned chunks (adapter.go)
	loads       []*pendingLoad
	gates       []*pendingLoad // loads the running step waits for layer by layer (gateLayer)
	gatedSteps  int            // steps that waited for an adapter image layer by layer
	pins        *imageCache    // adapter images kept in the uploader's pinned blocks (nil: none)
	pinN        int            // kept blocks to pin (StartPinning; Options.PinnedImageBytes)
	pinOnce     sync.Once      // StartPinning
	pinStarted  atomic.Bool    // StartPinning ran: pinDone will close
	pinDone     chan struct{}  // closes when pinBlocks ends (made by Init)
	pinStop     atomic.Bool    // Close: pinBlocks stops
	ringUploads atomic.Int64   // adapter uploads through the staging ring (PinnedStats)

	weights []*weight
	// FP8 projections (Options.WeightFormat fp8; nil for bf16) and the write
	// generation of the activation buffers: ops that may write one bump gen,
	// so the FP8 path re-uses a quantized input only while it is unchanged.
	f8      *fp8State
	gen     uint64
	buffers []*Buffer
	err     error

	// step timing (SetTiming): events around the device work of a step, in
	// two sets (tms) so that a step chained behind the one in flight
	// (chain.go) times itself while that one's times are still to be read
	timing     bool
	tms        [2]stepTimer
	tm         *stepTimer // the set of the step executed last
	lastStepMs float32
	lastTimed  bool // lastStepMs is the last step's
	chain      chainState
}

// SetTiming turns on device timing of each step: from the metadata upload
// in Begin to the start of the result copy in Read (StepMs reads it).
func (b *Backend) SetTiming(on bool) error {
	if on {
		for i := range b.tms {
			if err := b.tms[i].open(b.ctx); err != nil {
				return err
			}
		}
	}
	b.timing = on
	return nil
}

// StepMs is the device time of the last timed step in milliseconds (0 if none).
func (b *Backend) StepMs() float32 { return b.lastStepMs }

// StepDeviceTime is the device time of the last step when it was timed
// (engine.StepTimer).
func (b *Backend) StepDeviceTime() (time.Duration, bool) {
	return time.Duration(float64(b.lastStepMs) * 1e6), b.lastTimed
}

// startTiming records the step's start event when timing is on, in the
// set the step before did not use.
func (b *Backend) startTiming() error {
	b.lastTimed = false
	if b.tm == &b.tms[0] {
		b.tm = &b.tms[1]
	} else {
		b.tm = &b.tms[0]
	}
	return b.tm.start(b.s, b.timing)
}

// markForward records the end of the step's forward when it is timed.
func (b *Backend) markForward() error { return b.curTimer().markForward(b.s) }

// markTail records, at the step's first result call (SampleRows, Read),
// where the device may have waited for the host since the forward.
func (b *Backend) markTail() error { return b.curTimer().markTail(b.s) }

// markEnd records the end of the step's device work, before its result copy.
func (b *Backend) markEnd() error { return b.curTimer().markEnd(b.s) }

// curTimer is the current step's timer (an untimed one before any step).
func (b *Backend) curTimer() *stepTimer {
	if b.tm == nil {
		b.tm = &b.tms[0]
	}
	return b.tm
}

// waitStep waits for the step's work and, when it was timed, keeps its
// device time (stepTimer.ms).
func (b *Backend) waitStep() error {
	if err := b.s.Synchronize(); err != nil {
		return fmt.Errorf("gpu: step failed: %w", err)
	}
	b.keepTime(b.curTimer())
	return nil
}

// keepTime keeps tm's step's device time when it was timed.
func (b *Backend) keepTime(tm *stepTimer) {
	if ms, ok := tm.ms(); ok {
		b.lastStepMs, b.lastTimed = ms, true
	}
}

// New opens device opts.Device and loads the kernels (compiling them on a cold cache).
func New(opts Options) (*Backend, error) {
	ctx, err := cuda.NewContext(opts.Device)
	if err != nil {
		return nil, err
	}
	b := &Backend{ctx: ctx}
	if err := b.open(opts); err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

// bf16WS reports whether a Backend with weights of format (NoWS unset)
// loads the forward module's build with gemm_ws: bf16 weights on sm_90a,
// where PEFTD_KERNEL_DEFINES does not compile it in already.
func bf16WS(format string, noWS bool, arch string) bool {
	return format == WeightsBF16 && !noWS && arch == "sm_90a" && !kernels.Defined("PEFTD_WS") && !kernels.Defined("PEFTD_WG")
}

func (b *Backend) open(opts Options) error {
	b.g.off = opts.Eager
	b.g.recordIdle, b.g.rowsLimit = opts.RecordIdle, opts.GraphRows
	var err error
	if b.s, err = b.ctx.NewStream(); err != nil {
		return err
	}
	if b.cs, err = b.ctx.NewStream(); err != nil {
		return err
	}
	if !opts.NoPDL {
		// not every GPU can: then the kernels launch as before
		b.pdl = b.s.SetProgrammaticLaunch(true) == nil
	}
	b.tune.on, b.tune.fp8, b.tune.bf16, b.tune.cacheDir, b.chain.on = opts.TuneGEMMs, opts.TuneFP8, opts.TuneBF16, opts.TuneCacheDir, opts.ChainSteps
	b.tune.fp8From = max(opts.TuneFP8From, 0)
	b.la.on, b.la.sms = !opts.SerialLoRA, max(opts.LoRASMs, 0)
	b.guHalfOn, b.hugeHoldsOff = guHalfDefault(), hugeHoldsOff()
	b.xtsBuild = kernels.Defined("PEFTD_EXPAND_TS")
	b.outHalfOn, b.qkvHalfOn = outHalfDefault(), qkvHalfDefault()
	b.ws16On = ws16Default()
	b.pinN = int(PinnedBytes(opts.PinnedImageBytes) / stageChunkBytes)
	if opts.LoRASMs == 0 {
		b.la.sms = -1 // by the step's rows
	}
	if b.la.s, err = b.ctx.NewPriorityStream(); err != nil {
		return err
	}
	if b.pdl {
		// the LoRA stream's expand starts (and fetches its adapter's B)
		// while the shrink before it finishes
		if err := b.la.s.SetProgrammaticLaunch(true); err != nil {
			return err
		}
	}
	if b.la.fork, err = b.ctx.NewEvent(false); err != nil {
		return err
	}
	if b.la.join, err = b.ctx.NewEvent(false); err != nil {
		return err
	}
	ws := opts.WorkspaceBytes
	if ws <= 0 {
		ws = 32 << 20
	}
	if b.mm, err = b.ctx.NewMatmul(ws); err != nil {
		return err
	}
	b.mm.SetFastAccum(!opts.FP8PreciseAccum)
	// The fused SGMV module is first needed when an adapter loads: load it
	// (on a cold kernel cache, compile it) beside the main module now, so
	// that no compile lands on an adapter's first request.
	if opts.LoRAPartition != 0 {
		// kernels that run in the green context of the stream they are
		// launched on (a module's functions belong to the primary context)
		opts.Kernels.ContextFree = true
	}
	b.ctxFree = opts.Kernels.ContextFree
	sg := make(chan sgLoaded, 1)
	b.sgLoad = sg
	go func(ctx *cuda.Context) {
		m, _, err := kernels.Load(ctx, kernels.Sgmv, kernels.Options{ContextFree: b.ctxFree})
		sg <- sgLoaded{m, err}
	}(b.ctx)
	format, err := ParseWeightFormat(opts.WeightFormat)
	if err != nil {
		return err
	}
	// bf16 weights on sm_90a: the forward module's build with gemm_ws
	// (kernels.BF16Wgmma) unless Options.NoWS; where it cannot load (no
	// NVRTC, only shipped cubins without it), the default build serves
	if bf16WS(format, opts.NoWS, b.ctx.Device().Arch()) {
		ko := opts.Kernels
		ko.Extra = append(slices.Clip(ko.Extra), kernels.BF16Wgmma...)
		b.mod, b.KernelInfo, _ = kernels.Load(b.ctx, kernels.Llama, ko)
	}
	if b.mod == nil {
		if b.mod, b.KernelInfo, err = kernels.Load(b.ctx, kernels.Llama, opts.Kernels); err != nil {
			return err
		}
	}
	if b.sk, err = newBFSkinny(b.mod, b.ctx.Device()); err != nil {
		return err
	}
	limit := b.ctx.Device().MaxShared
	if limit <= 0 { // not reported: try them all
		limit = math.MaxInt
	}
	if b.bws, err = loadWS(b.ctx, b.s, b.mod, "gemm_ws", 2, limit); err != nil {
		return err
	}
	b.bwsAuto = format == WeightsBF16 && !opts.NoWS && b.bws != nil
	kvFormat, err := ParseKVFormat(opts.KVFormat)
	if err != nil {
		return err
	}
	if d := b.ctx.Device(); kvFormat == KVFP8 && d.Major*10+d.Minor < 89 {
		return fmt.Errorf("gpu: an FP8 KV cache needs FP8 conversions (sm_89 or later); %s is %s", d.Name, d.Arch())
	}
	b.kv8 = kvFormat == KVFP8
	if format == WeightsFP8 {
		if !opts.NoFP8Wgmma && b.ctx.Device().Arch() == "sm_90a" && !kernels.Defined("PEFTD_WG") {
			ko := opts.Kernels
			ko.Extra = append(slices.Clip(ko.Extra), kernels.FP8Wgmma...)
			// that build is compiled here unless cached: where it cannot be
			// (no NVRTC, only shipped cubins), the default module serves
			// and FP8Wgmma reports false
			b.f8, _ = newFP8(b.ctx, b.s, b.mm, ko)
		}
		if b.f8 == nil {
			if b.f8, err = newFP8(b.ctx, b.s, b.mm, opts.Kernels); err != nil {
				return err
			}
		}
		b.f8.wgAuto = !opts.NoFP8Wgmma && b.f8.wg != nil
		b.f8.wgAutoDefault = b.f8.wgAuto
		b.f8.wsAuto = !opts.NoWS && b.f8.ws != nil
		b.f8.wsAutoDefault = b.f8.wsAuto
		b.f8.wsLoneFrom, b.f8.wsBesideFrom = wsLoneFromDefault, wsBesideFromDefault
	}
	type fnName struct {
		p    **cuda.Function
		name string
	}
	fns := []fnName{{&b.fn.embed, "embed"}, {&b.fn.addRMSNorm, "add_rmsnorm"}, {&b.fn.rmsnormRows, "rmsnorm_rows"}, {&b.fn.ropeStore, "rope_store"},
		{&b.fn.attention, "attention"}, {&b.fn.siluMul, "silu_mul"}, {&b.fn.siluMulO2, "silu_mul_o2"}, {&b.fn.siluMulH, "silu_mul_h"}, {&b.fn.siluMulO2H, "silu_mul_o2h"}, {&b.fn.siluMulClH, "silu_mul_clh"}, {&b.fn.siluMulCl, "silu_mul_cl"}, {&b.fn.addRMSNormCl, "add_rmsnorm_cl"},
		{&b.fn.shrink, "lora_shrink"}, {&b.fn.expand, "lora_expand"},
		{&b.fn.sgShrink, "sgmv_shrink"}, {&b.fn.sgShrink4, "sgmv_shrink4"}, {&b.fn.sgShrink64, "sgmv_shrink64"}, {&b.fn.sgShrink64P, "sgmv_shrink64p"},
		{&b.fn.sgExpand, "sgmv_expand"},
		{&b.fn.sample, "sample_rows"}, {&b.fn.logitAdjust, "logit_adjust"}, {&b.fn.attnDecode[0], "attn_decode_d32"}, {&b.fn.attnDecode[1], "attn_decode_d64"},
		{&b.fn.attnDecode[2], "attn_decode_d128"}, {&b.fn.attnDecode[3], "attn_decode_d256"},
		{&b.fn.attnDecode8[0], "attn_decode8_d32"}, {&b.fn.attnDecode8[1], "attn_decode8_d64"},
		{&b.fn.attnDecode8[2], "attn_decode8_d128"}, {&b.fn.attnDecode8[3], "attn_decode8_d256"},
		{&b.fn.attnDecode2[0], "attn_decode2_d32"}, {&b.fn.attnDecode2[1], "attn_decode2_d64"},
		{&b.fn.attnDecode2[2], "attn_decode2_d128"}, {&b.fn.attnDecode2[3], "attn_decode2_d256"},
		{&b.fn.attnDecodeW8[0], "attn_decode_w8_d32"}, {&b.fn.attnDecodeW8[1], "attn_decode_w8_d64"}, {&b.fn.attnDecodeW8[2], "attn_decode_w8_d128"},
		{&b.fn.attnDecode8W2[0], "attn_decode8_w2_d32"}, {&b.fn.attnDecode8W2[1], "attn_decode8_w2_d64"},
		{&b.fn.attnDecode8W2[2], "attn_decode8_w2_d128"}, {&b.fn.attnDecode8W2[3], "attn_decode8_w2_d256"},
		{&b.fn.attnDecode8W8[0], "attn_decode8_w8_d32"}, {&b.fn.attnDecode8W8[1], "attn_decode8_w8_d64"}, {&b.fn.attnDecode8W8[2], "attn_decode8_w8_d128"},
		{&b.fn.attnPrefill[0], "attn_prefill_d32"}, {&b.fn.attnPrefill[1], "attn_prefill_d64"}, {&b.fn.attnPrefill[2], "attn_prefill_d128"},
		{&b.fn.attnPrefill8[0], "attn_prefill8_d32"}, {&b.fn.attnPrefill8[1], "attn_prefill8_d64"}, {&b.fn.attnPrefill8[2], "attn_prefill8_d128"},
		{&b.fn.addBias, "add_bias"}, {&b.fn.headRMSNorm, "head_rmsnorm"}, {&b.fn.addDelta, "add_delta"}, {&b.fn.addDeltaH, "add_delta_h"}, {&b.fn.addRMSNormH, "add_rmsnorm_h"}, {&b.fn.fillRows, "fill_rows"},
		{&b.fn.sgExpandTC[0], "sgmv_expand_tc1"}, {&b.fn.sgExpandTC[1], "sgmv_expand_tc2"}, {&b.fn.sgExpandTC[2], "sgmv_expand_tc4"},
		{&b.fn.sgExpandTCH[0], "sgmv_expand_tch1"}, {&b.fn.sgExpandTCH[1], "sgmv_expand_tch2"}, {&b.fn.sgExpandTCH[2], "sgmv_expand_tch4"},
		{&b.fn.sgExpandTC64S, "sgmv_expand_tc64s"}, {&b.fn.sgExpandTCHS, "sgmv_expand_tch1s"},
		{&b.fn.ropeRows, "rope_store_rows"}, {&b.fn.ropeRowsH, "rope_store_rows_h"}, {&b.fn.ropeStoreH, "rope_store_h"}, {&b.fn.ropeLoRA, "rope_store_lora"}}
	// kcat.go's kernels, only where PEFTD_KERNEL_DEFINES=-DPEFTD_KCAT
	// builds them in (the engine does not run them yet: TestKCatGroup)
	if kernels.Defined("PEFTD_KCAT") {
		fns = append(fns, fnName{&b.fn.loraCat, "lora_cat_e4m3"}, fnName{&b.fn.kcatSelectSplit, "kcat_select_split_e4m3"})
	}
	for _, f := range fns {
		if *f.p, err = b.mod.Function(f.name); err != nil {
			return err
		}
	}
	// Only the variants of the KV format in use get their shared memory
	// limit raised, and a variant that needs more than a block may have on
	// this card (99 KB on sm_86/sm_89: attn_decode_d256) is left out; Init
	// sends that head size to the per-row kernel.
	if b.sbpFits = limit >= sbpShared; b.sbpFits {
		if err := b.fn.sgShrink64P.SetMaxDynamicShared(sbpShared); err != nil {
			return err
		}
	}
	b.decFit, b.preFit = attnFits(limit, b.kv8)
	b.decW8Fit = w8Fits(limit, b.kv8)
	pre := b.fn.attnPrefill[:]
	if b.kv8 {
		pre = b.fn.attnPrefill8[:]
	}
	for i := range b.decFit {
		if !b.decFit[i] {
			continue
		}
		for v := range decVariants {
			if v == decV8 && !b.decW8Fit[i] {
				continue
			}
			if err := b.decKernel(v, i).SetMaxDynamicShared(decShared(32<<i, b.kv8, v)); err != nil {
				return err
			}
		}
	}
	for i, f := range pre {
		if !b.preFit[i] {
			continue
		}
		if err := f.SetMaxDynamicShared(preShared(32<<i, b.kv8)); err != nil {
			return err
		}
	}
	if opts.LoRAPartition != 0 {
		if err := b.openPartition(opts.LoRAPartition); err != nil {
			return err
		}
		// on from the start: nothing has run or been recorded yet (Init
		// sizes the attention plan for the SMs it then has)
		b.usePartition(true)
	}
	return nil
}

// attnFits says which attn_decode_d{32,64,128,256} and
// attn_prefill_d{32,64,128} variants (with FP8 keys when k8) fit in
// maxShared bytes of dynamic shared memory per block.
func attnFits(maxShared int, k8 bool) (dec [4]bool, pre [3]bool) {
	for i := range dec {
		dec[i] = decShared(32<<i, k8, decV4) <= maxShared
	}
	for i := range pre {
		pre[i] = preShared(32<<i, k8) <= maxShared
	}
	return dec, pre
}

// w8Fits reports, per head dimension (32, 64, 128, 256), whether
// attn_decode_w8 (attn_decode8_w8 with FP8 keys) exists for it (up to
// 128) and its shared memory fits a block of maxShared bytes.
func w8Fits(maxShared int, k8 bool) (fit [4]bool) {
	for i := range len(fit) - 1 {
		fit[i] = decShared(32<<i, k8, decV8) <= maxShared
	}
	return fit
}

// w8 reports whether attn_decode_w8 runs at the model's head dimension
// (decW8Fit).
func (b *Backend) w8() bool {
	i := headIndex(b.kv.HeadDim)
	return i < len(b.decW8Fit) && b.decW8Fit[i]
}

// headIndex is the variant index of head_dim hd in 32, 64, 128, 256.
func headIndex(hd int) int {
	i := 0
	for 32<<i < hd {
		i++
	}
	return i
}

// sizeDecode records how many attn_decode blocks the GPU holds at once for
// the model's head dimension, for each variant (decSplitFor plans waves of
// them).
func (b *Backend) sizeDecode() error {
	sms := b.baseSMs()
	for v := range decVariants {
		b.decResident[v] = sms
	}
	if !b.decOK {
		return nil
	}
	for v := range decVariants {
		if v == decV8 && !b.w8() {
			continue
		}
		per, err := b.decodeKernel(b.kv.HeadDim, v).BlocksPerSM(32*v.warps(), decShared(b.kv.HeadDim, b.kv8, v))
		if err != nil {
			return fmt.Errorf("gpu: attn_decode occupancy (variant %d): %w", v, err)
		}
		b.decResident[v] = max(1, per) * sms
	}
	return nil
}

// PDL reports whether the compute stream launches kernels with
// Programmatic Dependent Launch (Options.NoPDL).
func (b *Backend) PDL() bool { return b.pdl }

// Device describes the GPU.
func (b *Backend) Device() cuda.Device { return b.ctx.Device() }

// Name is "cuda".
func (b *Backend) Name() string { return "cuda" }

// Init allocates the KV cache and per-step scratch.
func (b *Backend) Init(cfg *llama.Config, spec engine.Spec) error {
	kv, maxTokens := spec.KV, spec.MaxTokens
	if kv.KVHeads != cfg.KVHeads || kv.HeadDim != cfg.HeadDim || kv.Layers != cfg.Layers {
		return fmt.Errorf("gpu: KV spec %+v does not match the model", kv)
	}
	if cfg.HeadDim > 256 {
		return fmt.Errorf("gpu: head_dim %d > 256 is not supported by the attention kernel", cfg.HeadDim)
	}
	b.cfg, b.kv, b.maxT = cfg, kv, maxTokens
	hd := kv.HeadDim
	b.decOK = hd >= 32 && hd <= 256 && hd&(hd-1) == 0 && cfg.Heads%kv.KVHeads == 0 && cfg.Heads/kv.KVHeads <= decMaxG && b.decFit[headIndex(hd)]
	b.preOK = hd >= 32 && hd <= 128 && hd&(hd-1) == 0 && cfg.Heads%kv.KVHeads == 0 && b.preFit[headIndex(hd)]
	if err := b.sizeDecode(); err != nil {
		return err
	}
	width := kv.KVHeads * kv.HeadDim
	b.layerB = kv.Blocks * kv.BlockSize * width * 2
	b.layerKB = b.layerB
	if b.kv8 { // e4m3 keys and their scales
		b.layerKB = kv.Blocks * kv.BlockSize * width
		b.layerSB = kv.Blocks * kv.BlockSize * kv.KVHeads * 4
	}
	var err error
	if b.kcache, err = b.ctx.Alloc(kv.Layers * b.layerKB); err != nil {
		return fmt.Errorf("gpu: KV cache: %w", err)
	}
	if b.kv8 {
		if b.kscale, err = b.ctx.Alloc(kv.Layers * b.layerSB); err != nil {
			return fmt.Errorf("gpu: KV cache scales: %w", err)
		}
	}
	if b.vcache, err = b.ctx.Alloc(kv.Layers * b.layerB); err != nil {
		return fmt.Errorf("gpu: KV cache: %w", err)
	}
	if err := b.growMeta(11*maxTokens + kv.Blocks + 16); err != nil {
		return err
	}
	if b.normed, err = b.ctx.Alloc(maxTokens * cfg.Hidden * 2); err != nil {
		return err
	}
	if b.invFreq, err = b.ctx.Alloc(cfg.HeadDim / 2 * 4); err != nil {
		return err
	}
	// attn_decode's split counters: one per (decode row, KV head), zero
	// between launches (the block that merges a row's splits resets its own).
	if b.attnDone, err = b.ctx.Alloc(4 * maxTokens * kv.KVHeads); err != nil {
		return err
	}
	if err := cuda.CopyHtoD(b.s, b.attnDone.Ptr(), make([]int32, maxTokens*kv.KVHeads)); err != nil {
		return err
	}
	// Sized once, so that recorded graphs never see them move.
	if err := b.growTable(max(spec.AdapterSlots, 1)); err != nil {
		return err
	}
	// the LoRA update buffer holds the steps of up to GraphRows' bucket
	// (not rounded down to maxTokens' bucket: a step of any rows up to it)
	if err := b.la.alloc(b.ctx, min(maxTokens, graphRowsFor(math.MaxInt, b.g.rowsLimit)), cfg); err != nil {
		return err
	}
	if err := b.applyL2Window(); err != nil {
		return err
	}
	if b.up == nil { // pinned once, before any step: no adapter load pins memory while steps run
		if b.up, err = b.ctx.NewUploader(stageChunks, stageChunkBytes); err != nil {
			return fmt.Errorf("gpu: adapter staging: %w", err)
		}
		// the kept blocks are pinned later, on a goroutine (StartPinning)
		b.pinDone = make(chan struct{})
		if b.pinN > 0 {
			b.pins = newImageCache(0, stageChunkBytes)
		}
	}
	if b.f8 != nil {
		if err := b.f8.reserve(maxTokens, max(cfg.Hidden, cfg.Intermediate)); err != nil {
			return err
		}
	}
	b.g.slots = max(spec.AdapterSlots, 1)
	maxContext := spec.MaxContext
	if maxContext <= 0 {
		maxContext = kv.Blocks * kv.BlockSize
	}
	if !graphsUsable() {
		b.g.off = true
	}
	// every step is timed on the device (two events): the scheduler
	// reports it beside the step's wall time
	if err := b.SetTiming(true); err != nil {
		return err
	}
	return b.initGraphs(maxContext)
}

func (b *Backend) growMeta(n int) error {
	if b.metaHost != nil && b.metaHost.Size() >= 4*n {
		return nil
	}
	if err := b.s.Synchronize(); err != nil {
		return err
	}
	b.metaHost.Free()
	b.metaDev.Free()
	var err error
	if b.metaHost, err = b.ctx.AllocHost(4 * n); err != nil {
		return err
	}
	b.metaDev, err = b.ctx.Alloc(4 * n)
	return err
}

// Upload converts a tensor to bf16 on the device; with FP8 weights, a
// decoder layer's projection is then quantized to e4m3 on the device (one
// float32 scale per output row) and only the e4m3 copy is kept.
func (b *Backend) Upload(name string, dtype safetensors.DType, shape []int, raw []byte) (engine.Weight, error) {
	return b.UploadParts(name, dtype, shape, [][]byte{raw})
}

// UploadParts is Upload of the tensor whose data is parts joined in order
// (engine.PartsUploader): each part goes to its place on the device (or
// into the host copy the FP8 quantization reads) straight from where it
// lies, never joined on the host first.
func (b *Backend) UploadParts(name string, dtype safetensors.DType, shape []int, parts [][]byte) (engine.Weight, error) {
	n := 1
	for _, d := range shape {
		n *= d
	}
	w := &weight{rows: 1, cols: n}
	if len(shape) == 2 {
		w.rows, w.cols, w.proj = shape[0], shape[1], fp8Projection(name, shape)
	} else if len(shape) != 1 {
		return nil, fmt.Errorf("gpu: %s: %d-dimensional tensors are not supported", name, len(shape))
	}
	sz, total := dtype.Size(), 0
	for _, p := range parts {
		if sz == 0 || len(p)%sz != 0 {
			return nil, fmt.Errorf("%s: %w: a part of %d bytes of %s", name, safetensors.ErrDType, len(p), dtype)
		}
		total += len(p)
	}
	if total != n*sz {
		return nil, fmt.Errorf("%s: %w: %d bytes of %s for %d values", name, safetensors.ErrDType, total, dtype, n)
	}
	if b.f8 != nil && fp8Projection(name, shape) {
		host := make([]uint16, n)
		off := 0
		for _, p := range parts {
			cnt := len(p) / sz
			if err := encodeBF16Parallel(host[off:off+cnt], p, dtype); err != nil {
				return nil, fmt.Errorf("%s: %w", name, err)
			}
			off += cnt
		}
		fw, err := b.f8.upload(host, w.rows, w.cols)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		return fw, nil
	}
	var err error
	if w.mem, err = b.ctx.Alloc(2 * n); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	b.weights = append(b.weights, w)
	off := 0
	for _, p := range parts {
		cnt := len(p) / sz
		if err := b.stageUpload(w.mem.Ptr()+cuda.DevicePtr(2*off), p, dtype, cnt); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		off += cnt
	}
	return w, nil
}

// The engine finds these by type assertions: keep their signatures.
var (
	_ engine.PartsUploader = (*Backend)(nil)
	_ engine.FP8Uploader   = (*Backend)(nil)
)

// NewBuffer allocates a bf16 activation matrix.
func (b *Backend) NewBuffer(rows, cols int) (engine.Buffer, error) {
	m, err := b.ctx.Alloc(rows * cols * 2)
	if err != nil {
		return nil, err
	}
	buf := &Buffer{mem: m, rows: rows, cols: cols, ld: cols}
	b.buffers = append(b.buffers, buf)
	return buf, nil
}

// NewView is columns [col, col+cols) of every row of parent (a buffer from
// NewBuffer): the q, k and v of a fused qkv output, the gate and up of a
// fused gate_up output.
func (b *Backend) NewView(parent engine.Buffer, col, cols int) (engine.Buffer, error) {
	p, ok := parent.(*Buffer)
	if !ok || p == nil || !p.whole() {
		return nil, fmt.Errorf("gpu: view of a buffer that is not a whole buffer of this backend")
	}
	if col < 0 || cols <= 0 || col+cols > p.cols {
		return nil, fmt.Errorf("gpu: view [%d, %d) of a buffer of %d columns", col, col+cols, p.cols)
	}
	return &Buffer{mem: p.mem, rows: p.rows, cols: cols, off: col, ld: p.ld}, nil
}

// Close frees every device resource and releases the context.
func (b *Backend) Close() error {
	if b.ctx == nil {
		return nil
	}
	b.life.Lock() // no PrepareAdapter from here on
	b.closed = true
	b.life.Unlock()
	var errs []error
	if b.s != nil {
		errs = append(errs, b.s.Synchronize())
	}
	errs = append(errs, b.freeStaging())
	if b.pinDone != nil {
		b.pinStop.Store(true)
		b.StartPinning() // if it never started: it ends at once
		<-b.pinDone
	}
	errs = append(errs, b.closeLoads()) // adapter uploads may still fill a slot
	if b.l2Aside > 0 {                  // the L2 set aside for the LoRA update back to every access
		errs = append(errs, b.ctx.SetPersistingL2(0))
	}
	for _, w := range b.weights {
		errs = append(errs, w.mem.Free())
	}
	for _, x := range b.buffers {
		errs = append(errs, x.mem.Free(), x.f32.Free())
	}
	for _, s := range b.slots {
		if s != nil {
			errs = append(errs, s.mem.Free())
		}
	}
	errs = append(errs, b.dropGraphs(), b.smPart.close(b))
	for _, d := range []*cuda.DeviceBuffer{b.kcache, b.kscale, b.vcache, b.metaDev, b.invFreq, b.normed, b.table, b.loraTmp, b.smp[0].dev, b.smp[1].dev, b.attnPart, b.attnDone,
		b.g.dev, b.g.part, b.g.tmp, b.la.delta, b.expandTS} {
		errs = append(errs, d.Free())
	}
	for _, h := range []*cuda.HostBuffer{b.metaHost, b.readHost, b.smp[0].host, b.smp[1].host, b.g.host, b.g.host2} {
		errs = append(errs, h.Free())
	}
	errs = append(errs, b.tms[0].close(), b.tms[1].close(), b.chain.close(), b.la.fork.Destroy(), b.la.join.Destroy(), b.la.s.Destroy())
	errs = append(errs, b.f8.close(), b.bws.free())
	if b.sgLoad != nil { // never taken: wait for it (it uses the context)
		if r := <-b.sgLoad; r.m != nil {
			errs = append(errs, r.m.Unload())
		}
		b.sgLoad = nil
	}
	errs = append(errs, b.mm.Close(), b.mod.Unload(), b.s.Destroy(), b.cs.Destroy(), b.ctx.Close())
	b.weights, b.buffers, b.slots, b.ctx = nil, nil, nil, nil
	return errors.Join(errs...)
}

// Run calls fn on the CUDA context's thread: every op fn issues runs inline
// there (no per-op hop to the executor goroutine). The engine wraps each
// step in it (engine.Runner).
func (b *Backend) Run(fn func() error) error { return b.ctx.Do(fn) }

var (
	_ engine.Backend       = (*Backend)(nil)
	_ engine.Runner        = (*Backend)(nil)
	_ engine.DeviceSampler = (*Backend)(nil)
	_ engine.StepTimer     = (*Backend)(nil)
)
