// Package engine runs the Llama forward pass over a batch of sequences, each
// with its own LoRA adapter (or none), on a Backend, with a paged KV cache.
package engine

import (
	"time"

	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/safetensors"
	"github.com/peftd/peftd/runtime/sample"
)

// Buffer is a backend-owned activation matrix of [rows, cols] float values.
type Buffer interface{ Cols() int }

// Weight is a backend-owned model weight.
type Weight interface{}

// KVSpec sizes the paged KV cache.
type KVSpec struct {
	Layers, Blocks, BlockSize, KVHeads, HeadDim int
}

// SeqMeta describes one sequence's tokens in a step.
type SeqMeta struct {
	Start   int     // first row of the sequence in the step's token rows
	Len     int     // rows this step
	Context int     // tokens in the KV cache after this step (the last row's position + 1)
	Blocks  []int32 // page table: KV block of each BlockSize-token page
}

// Segment is a run of rows [Start, End) that share an adapter slot.
type Segment struct{ Start, End, Slot int }

// StepMeta is the host-side description of one forward pass.
type StepMeta struct {
	Tokens    []int32 // token id of each row
	Positions []int32 // position of each row
	KVSlots   []int32 // KV cache slot of each row: block*BlockSize + offset
	Seqs      []SeqMeta
	LoRA      []Segment // rows with an adapter; rows outside every segment use none
	LogitRows []int32   // rows whose logits are returned, in output order
	// TokenFrom, when set (a step launched before the tokens of the step
	// before it are back: Chainer), is per row -1 or the index of the
	// previous step's sample row whose drawn token the row takes instead
	// of Tokens[row].
	TokenFrom []int32
}

// Spec sizes what a backend allocates once, at Init.
type Spec struct {
	MaxTokens    int // rows per step
	KV           KVSpec
	AdapterSlots int // adapter slots the engine uses (0..AdapterSlots-1)
	MaxContext   int // tokens per sequence (a page table holds at most its pages)
}

// Ops are the forward pass primitives a Program issues. They act on the
// first len(meta.Tokens) rows of their buffers (LogitRows for Logits), or on
// more rows where the backend pads a step (rows past the step's own are
// scratch: they never touch another row, the KV cache or an output row).
type Ops interface {
	Embed(out Buffer, table Weight)
	// AddRMSNorm: if delta != nil, x += delta; then, if out != nil, out = rmsnorm(x) * w.
	AddRMSNorm(x, delta, out Buffer, w Weight, eps float32)
	// Linear: out = in @ W^T.
	Linear(out, in Buffer, w Weight)
	// LoRA: for each projection mods[i] of one fused group (q, k, v or
	// gate, up: projections that read the same input), the columns of out
	// that hold its output (out holds the group's outputs side by side, in
	// mods order) += scale * (in @ A^T) @ B^T with each row's adapter
	// (meta.LoRA); rows without an adapter, and adapters without a
	// projection in this layer, add nothing. A backend may run the update
	// beside the group's Linear and fold it into the next op that reads
	// out, as long as every op sees out with the update added.
	LoRA(out, in Buffer, layer int, mods []llama.Module)
	// Attention rotates q and k in place at meta.Positions (RoPE,
	// rotate-half layout, frequencies invFreq), writes k and v into the
	// cache at meta.KVSlots, then computes causal attention of q over each
	// sequence's cache. A nil invFreq rotates nothing.
	Attention(out, q, k, v Buffer, layer int, scale float32, invFreq []float32)
	// SiLUMul: out = silu(gate) * up.
	SiLUMul(out, gate, up Buffer)
	// Logits: out[i] = rmsnorm(x[LogitRows[i]]) * norm @ head^T.
	Logits(out, x Buffer, norm, head Weight, eps float32)
}

// Shape is what the ops a Program issues depend on besides the values in
// the step's metadata: a backend may record a program's ops once per
// (Shape, step size) and replay the record for every later step of that
// kind (the CUDA backend captures decode steps as CUDA graphs).
type Shape struct {
	// LoRA has bit m set when the program applies adapters to projection m
	// (llama.Module); 0 for a step without adapters.
	LoRA uint8
}

// Program is one step's forward pass: Run issues its ops, always the same
// ones for the same Shape.
type Program struct {
	Shape Shape
	Run   func(Ops)
}

// Backend runs whole steps: the engine hands it a step's metadata and its
// program, and the backend decides how the program's ops execute (one at a
// time, or replayed from a recording). The work may run asynchronously
// until Read, a DeviceSampler's SampleRows, or End. One goroutine drives a
// backend.
type Backend interface {
	Name() string
	// Init sizes the KV cache, per-step scratch and the adapter table.
	Init(cfg *llama.Config, spec Spec) error
	// Upload turns a checkpoint tensor (raw little-endian data) into a Weight.
	Upload(name string, dtype safetensors.DType, shape []int, raw []byte) (Weight, error)
	NewBuffer(rows, cols int) (Buffer, error)
	// NewView is columns [col, col+cols) of every row of a buffer from
	// NewBuffer, sharing its memory (the q, k and v of a fused qkv output).
	NewView(b Buffer, col, cols int) (Buffer, error)
	// LoadAdapter places an adapter's weights in a device slot, replacing what was there.
	LoadAdapter(slot int, a *lora.Adapter) error
	UnloadAdapter(slot int) error

	// Execute runs prog over the step meta describes. An error in the
	// metadata is returned; an error of the work itself may surface only
	// in Read, SampleRows or End.
	Execute(meta *StepMeta, prog Program) error
	// Read copies the first rows of b to dst (rows*cols values), waiting for the step.
	Read(b Buffer, rows int, dst []float32) error
	// End finishes the step, reporting the first error of its work.
	End() error
	Close() error
}

// Warmer is an optional Backend capability: Warmup prepares whatever the
// backend records per program and step size (CUDA graphs), so that serving
// does not pay for it: at most max of the recordings progs still lack
// (max <= 0: all of them), reporting how many it recorded and how many are
// still missing after.
// Called between steps, on the engine goroutine, before the first request
// or while the engine is idle.
type Warmer interface {
	Warmup(progs []Program, max int) (recorded, left int, err error)
}

// RecordMisser is an optional Backend capability of a Warmer that leaves
// recording to Warmup: MissedRecording reports whether a step ran without
// its recorded program since the last call (a Warmup would record it).
type RecordMisser interface {
	MissedRecording() bool
}

// StepTimer is an optional Backend capability: the device time of the last
// step (ok false when it was not measured).
type StepTimer interface {
	StepDeviceTime() (d time.Duration, ok bool)
}

// Runner is an optional Backend capability: Run calls fn, which issues every
// op of one step, in the backend's own execution context (for the CUDA
// backend: on the OS thread that holds the device context), so the ops of a
// step pay no per-op hand-off. Run returns fn's error.
type Runner interface {
	Run(fn func() error) error
}

// RowSample asks a DeviceSampler for one token from one logits row.
type RowSample struct {
	Row    int           // row of the logits buffer (output order, as LogitRows)
	Params sample.Params // valid; Params.Seed is ignored (Seed below is used)
	// Seed and Counter key the counter-based random stream: the draw for
	// (Seed, Counter) is fixed, whatever else is in the step.
	Seed, Counter uint64
	// Adjust changes the row's logits before the draw (penalties and logit
	// bias, sample.Apply; tokens in range, each at most once).
	Adjust []sample.Adjust
}

// DeviceSampler is an optional Backend capability: it samples tokens from
// the logits the step's Logits op wrote without copying the logits to the
// host. SampleRows waits for the step and fills out[i] for rows[i]: the
// token, the log-softmax of the row's logits (after its Adjust) at it, and the Params.Logprobs
// most likely tokens with theirs (as sample.Sampler.Sample).
type DeviceSampler interface {
	SampleRows(logits Buffer, rows []RowSample, out []sample.Choice) error
}

// Chainer is an optional capability of a DeviceSampler: the next step may
// be executed before the tokens of the one before it are back, its rows
// reading those tokens on the device (StepMeta.TokenFrom), so the device
// never waits for the host between two steps.
//
// For a step, IssueSample starts what SampleRows does without waiting
// (the engine issues a step's draw right behind its forward when the
// backend Chains); then the next step may be executed (Chainable must have
// said it can) and its draw issued; WaitSample waits for the draw issued
// first among those not waited for yet and fills out as SampleRows would;
// the engine calls End once no step is in flight. At most two steps, and
// two draws, are in flight.
type Chainer interface {
	DeviceSampler
	IssueSample(logits Buffer, rows []RowSample) error
	WaitSample(out []sample.Choice) error
	// Chainable reports whether the step meta describes can be executed
	// while the step before it is in flight (say, a recorded program that
	// needs no recording, and no adapter upload in progress).
	Chainable(meta *StepMeta, prog Program) bool
	// Chains reports whether the backend chains steps at all (an option
	// may turn it off): when it does not, no step is planned for it.
	Chains() bool
}

// PreparedAdapter is an adapter staged by an AdapterPreparer for
// LoadPrepared. Release frees the staging if it was never loaded; it is safe
// to call more than once, and after a load (then it does nothing).
type PreparedAdapter interface {
	Release()
}

// AdapterPreparer is an optional Backend capability: loading an adapter in
// two parts so that the running batch never waits for it. PrepareAdapter
// starts the host work (conversion, layout, staging) and the upload, which
// may go on after it returns, and may be called from any goroutine while
// steps run; LoadPrepared, on the goroutine that drives the backend and
// between steps, places the adapter in slot, as LoadAdapter would, without
// waiting for the upload: the first step that uses the slot waits for it
// (the CUDA backend layer by layer), other steps do not. LoadPrepared
// consumes p, also when it fails. The adapter's weights must not change
// until the upload is over.
type AdapterPreparer interface {
	PrepareAdapter(a *lora.Adapter) (PreparedAdapter, error)
	LoadPrepared(slot int, p PreparedAdapter) error
}

// SlotError is a step that failed because the adapter in Slot cannot be
// used (its upload failed after LoadPrepared). The step's results are
// discarded and no sequence advanced (Step's rule on error; a rerun writes
// the same KV rows again), so the sequences on other slots may run again
// without it.
type SlotError struct {
	Slot int
	Err  error
}

func (e *SlotError) Error() string { return e.Err.Error() }
func (e *SlotError) Unwrap() error { return e.Err }

// FP8Uploader is a Backend that computes with FP8 (e4m3) projection
// weights and takes an FP8 checkpoint's weights as stored: e4m3 bytes q
// [rows, cols] with one float32 scale per row (W = q * scale[row]), not
// dequantized to bf16 and quantized again. New hands it every projection
// (q, k and v stacked; gate and up stacked) whose parts are all F8_E4M3
// and that KeepsFP8 accepts; the others go through Upload.
type FP8Uploader interface {
	KeepsFP8(name string, rows, cols int) bool
	// UploadFP8 takes the e4m3 rows in parts, stacked in order (q, k, v or
	// gate, up: straight from the mapped checkpoint, never joined on the
	// host), and the scales of all the rows.
	UploadFP8(name string, rows, cols int, q [][]byte, scale []float32) (Weight, error)
}

// PartsUploader is an optional Backend capability: UploadParts is Upload of
// the tensor whose raw data is parts joined in order (the rows of stacked
// projections, each straight from the mapped checkpoint), without joining
// them on the host first. New uses it for stacked weights when it is there.
type PartsUploader interface {
	UploadParts(name string, dtype safetensors.DType, shape []int, parts [][]byte) (Weight, error)
}

// LinearLoRAOps is an optional capability of Ops: a fused group's product
// and its LoRA update issued as one op, so that a backend may compute the
// update's shrink inside the product (the CUDA backend does for the few
// rows of a decode step). The engine calls it in place of Linear then LoRA
// where nothing comes between them.
type LinearLoRAOps interface {
	// LinearLoRA is Linear(out, in, w) and then LoRA(out, in, layer, mods).
	LinearLoRA(out, in Buffer, w Weight, layer int, mods []llama.Module)
}

// LinearSiLUOps is an optional capability of Ops: the gate/up product and
// SiLUMul of its two halves as one op, so that a backend may compute
// silu(gate) * up in the product's end and never store gate and up (the
// CUDA backend can, for bf16 and FP8 steps of 17-64 rows, where its
// kernelForce.wsSiLU turns it on). The engine calls it where no LoRA
// update changes the product.
type LinearSiLUOps interface {
	// LinearSiLU is Linear(gateUp, in, w) and then SiLUMul(act, gate, up)
	// for gate and up the halves of gateUp, without writing gateUp; false
	// when the backend does not take this product (nothing was done: the
	// engine issues the two ops).
	LinearSiLU(act, in Buffer, w Weight) bool
}

// LinearAddRMSNormOps is an optional capability of Ops: a projection and
// the AddRMSNorm of the residual stream after it as one op, so that a
// backend may do the add and the norm in the product's end instead of a
// launch of their own (the CUDA backend can, for the o and down products
// of bf16 and FP8 steps of 17-64 rows, where its kernelForce.wsNorm turns
// it on). The engine calls it where no LoRA update changes the product.
type LinearAddRMSNormOps interface {
	// LinearAddRMSNorm is Linear(delta, in, w) and then AddRMSNorm(x,
	// delta, out, norm, eps) (out and norm nil: only the add); false when
	// the backend does not take this product (nothing was done: the
	// engine issues the two ops).
	LinearAddRMSNorm(delta, in Buffer, w Weight, x, out Buffer, norm Weight, eps float32) bool
}

// FamilyOps are what models beyond Llama's layout need; a backend without
// them runs Llama and Mistral models, and New refuses the others by name.
type FamilyOps interface {
	// AddBias adds bias (one value per column) to every row of out (Qwen2's
	// q, k and v projections).
	AddBias(out Buffer, bias Weight)
	// HeadRMSNorm normalizes each head of every row of x in place: the row
	// is heads slices of headDim values, each RMS-normalized and scaled by
	// w (headDim values) (Qwen3's q_norm and k_norm).
	HeadRMSNorm(x Buffer, heads, headDim int, w Weight, eps float32)
}
