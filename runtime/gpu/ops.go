package gpu

import (
	"fmt"
	"math/bits"
	"slices"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
)

// Embed gathers embedding rows.
func (b *Backend) Embed(out engine.Buffer, table engine.Weight) {
	b.opStart()
	if !b.ok() {
		return
	}
	o, t := buf(out), table.(*weight)
	if !b.check(o.cols == t.cols && o.whole(), "embed: buffer width %d, table width %d", o.cols, t.cols) {
		return
	}
	var from, ring uint64 // chained steps (chain.go): rows may take their tokens from the ring
	if b.chain.on && b.graphLayout {
		from, ring = uint64(b.i32(b.off.tokFrom)), b.chain.ring.Ptr()
	}
	b.launch(b.fn.embed, cuda.Dim3{X: b.rows()}, cuda.Dim3{X: 256}, o.mem, t.mem, b.i32(b.off.tokens), from, ring, t.cols)
}

// AddRMSNorm: x += delta (if any), then out = rmsnorm(x) * w (if out).
func (b *Backend) AddRMSNorm(x, delta, out engine.Buffer, w engine.Weight, eps float32) {
	xb, d, o := buf(x), buf(delta), buf(out)
	var d2 uint64 // a LoRA update of delta (o or down) from the LoRA stream
	half := false // d2 is bf16 (outHalf): add_rmsnorm_h
	if d != nil && d.whole() {
		if p, _, h := b.fuseHalf(true, d); p != nil {
			d2, half = p[0], h
		}
	}
	b.opStart()
	if !b.ok() {
		return
	}
	if d == nil && o == nil {
		return
	}
	if !b.check(xb.whole() && (d == nil || d.whole()) && (o == nil || o.whole()), "rmsnorm: views are not supported") {
		return
	}
	var wp uint64
	if o != nil {
		wt := w.(*weight)
		if !b.check(wt.cols == xb.cols && o.cols == xb.cols, "rmsnorm: widths %d, %d, %d", xb.cols, o.cols, wt.cols) {
			return
		}
		wp = wt.mem.Ptr()
	}
	// with FP8 projections the normalized rows (what they read next) are
	// quantized by the same kernel, into the activation scratch
	var q, qs uint64
	if o != nil && b.f8 != nil && b.f8.fits(b.rows(), xb.cols) {
		q, qs = b.f8.actQ.Ptr(), b.f8.actS.Ptr()
	}
	f := b.fn.addRMSNorm
	if half {
		f = b.fn.addRMSNormH
		b.normHalfs++
	}
	if d != nil && o != nil && !half && b.addClFits(xb.cols, d2 != 0) { // norm_cl.go
		b.addRMSNormCl(xb, d, o, d2, wp, eps, q, qs)
	} else {
		b.launch(f, cuda.Dim3{X: b.rows()}, cuda.Dim3{X: 256}, xb.mem, ptr(d), d2, b.rowLora(), ptr(o), wp, eps, xb.cols, q, qs)
	}
	if q != 0 && b.err == nil {
		b.f8.holds(o.mem.Ptr(), b.rows(), xb.cols, b.gen)
	}
}

// AddBias adds bias to every row of out (engine.FamilyOps: Qwen2).
func (b *Backend) AddBias(out engine.Buffer, bias engine.Weight) {
	b.join() // keeps the GEMM input mark: a LoRA update of that input may follow
	b.gen++
	if !b.ok() {
		return
	}
	o, wt := buf(out), bias.(*weight)
	if !b.check(wt.cols == o.cols && o.whole(), "add_bias: widths %d, %d", o.cols, wt.cols) {
		return
	}
	b.launch(b.fn.addBias, cuda.Dim3{X: b.rows()}, cuda.Dim3{X: 256}, o.mem, wt.mem.Ptr(), o.cols)
	b.wrote(out)
}

// HeadRMSNorm normalizes each head of every row of x in place
// (engine.FamilyOps: Qwen3's q_norm, k_norm).
func (b *Backend) HeadRMSNorm(x engine.Buffer, heads, headDim int, w engine.Weight, eps float32) {
	b.opStart()
	if !b.ok() {
		return
	}
	xb, wt := buf(x), w.(*weight)
	if !b.check(heads*headDim == xb.cols && wt.cols == headDim, "head_rmsnorm: %d heads x %d for width %d, weight %d", heads, headDim, xb.cols, wt.cols) {
		return
	}
	b.launch(b.fn.headRMSNorm, cuda.Dim3{X: b.rows(), Y: heads}, cuda.Dim3{X: 32}, ptr(xb), wt.mem.Ptr(), eps, heads, headDim, xb.ld)
	b.wrote(x)
}

// productSMs is the SMs the product of w leaves to the LoRA stream beside
// it: holdFor the step's rows and w's shape.
func (b *Backend) productSMs(w engine.Weight) int {
	n, k := weightShape(w)
	_, fp8 := w.(*fp8Weight)
	return b.holdFor(b.rows(), n, k, fp8)
}

// holdFor is the SMs a product of a step of rows rows with an n x k weight
// (FP8 or bf16) leaves to the LoRA stream: kernelForce.holds for its group
// where set (negative: none, the product takes every SM and the LoRA
// stream's blocks share them), else Options.LoRASMs where set, else
// autoHolds by its group (found by the shape: groupOf) or autoLoRASMs for
// a product of no group.
func (b *Backend) holdFor(rows, n, k int, fp8 bool) int {
	g := b.groupOf(n, k)
	if g >= 0 && b.force.holds[g] != 0 {
		return max(b.force.holds[g], 0)
	}
	if g < 0 || b.la.sms >= 0 {
		return b.loraSMsFor(rows)
	}
	if fp8 && b.f8 != nil && b.f8.wsBeside(rows) {
		return autoSmallHoldsFP8[g]
	}
	return autoHolds(rows, fp8, !b.hugeHoldsOff)[g]
}

// serialGroup reports whether the LoRA update of w's fused group runs
// after its product on the compute stream (in place, as Options.SerialLoRA
// runs every update, the product on every SM) instead of beside it on the
// LoRA stream: kernelForce.serialLoRA's mask (benchmarks: TestDecodeBench
// +serN). Never by default: FP8, four rank-32 adapters, H100 (PERFORMANCE
// v0.84), mixed steps (64 decode rows and a 176-token prompt) 7.24 ms
// beside, 7.61 / 7.72 / 7.47 with o / gate/up / down serial; 256 rows
// 12.77 against 13.25 (gate/up) and 13.02 (down).
func (b *Backend) serialGroup(w engine.Weight) bool {
	if b.force.serialLoRA <= 0 || !b.stepLoRA() {
		return false
	}
	g := b.groupOf(weightShape(w))
	return g >= 0 && b.force.serialLoRA&(1<<g) != 0
}

// autoSmallHoldsFP8 is what each fused group's FP8 product leaves to the
// LoRA stream in steps whose products beside an update take fp8_ws below
// wsMinRows rows (fp8State.wsBeside): ws plans for the rest. H100, four
// rank-32 adapters, 16 rows, device ms a step (PERFORMANCE v0.84): 16 from
// each 4.61, 8.8.16.8 4.61, 16.16.24.16 4.73, none (fp8_ws and the LoRA
// kernels taking turns) 4.71, against fp8_stream's 4.69; 9 and 12 rows
// 16.16.16.16 0.001 ms ahead of 8.8.16.8.
var autoSmallHoldsFP8 = [4]int{16, 16, 16, 16}

// autoHolds is the SMs each fused group's product (llama.FusedGroups'
// order: q/k/v, o, gate/up, down) leaves to the LoRA stream in a step of
// rows rows with automatic SMs: autoLoRASMs, but for the q/k/v product
// autoQKVSMs from autoQKVMinRows rows (its update outlasts the product
// there: PERFORMANCE v0.31-v0.32) and with FP8 weights autoFP8OutSMs for
// the o and down products there too; above autoWideRows rows
// autoWideHolds (autoMidHoldsFP8 and autoBigHoldsFP8 for FP8 weights, and
// with huge autoHugeHoldsFP8 above fp8HugeRows), and autoWideHoldsFP8 for
// FP8 steps that fp8_wg takes whole (gemvMaxRows+1 to fp8WgAllRows).
func autoHolds(rows int, fp8, huge bool) [4]int {
	if rows > autoWideRows {
		switch {
		case fp8 && rows <= fp8MidRows:
			return autoMidHoldsFP8
		case fp8 && huge && rows > fp8HugeRows:
			return autoHugeHoldsFP8
		case fp8:
			return autoBigHoldsFP8
		}
		return autoWideHolds
	}
	if fp8 && rows > gemvMaxRows && rows <= fp8WgAllRows {
		return autoWideHoldsFP8
	}
	s := autoLoRASMs(rows)
	h := [4]int{s, s, s, s}
	if rows >= autoQKVMinRows {
		h[0] = autoQKVSMs
		if fp8 {
			h[1], h[3] = autoFP8OutSMs, autoFP8OutSMs
		}
	}
	return h
}

// fp8WgAllRows is the most rows at which every FP8 product is fp8_wg's
// (wgAutoFits), which keeps to the SM target; from 17 rows to it FP8 steps
// hold autoWideHoldsFP8. H200, four rank-32 adapters, device ms a step
// (v0.41), 24 / 32 rows against 16 SMs from every product: 32.32.16.32
// 4.20 / 4.40 vs 4.40 / 4.60 (ratio to base 0.875 / 0.872 -> 0.917 /
// 0.911), 48.32.16.32 4.19 / 4.39, 32.48.16.48 4.23 / 4.42, 32.32.32.32
// 4.28 / 4.50, 24.24.16.24 4.33 / 4.52; at 48 rows (cuBLASLt for q/k/v, o
// and down) 16.32.16.32 and 32.32.16.32 5.52 vs 5.49, so 33-63 rows keep
// 16; bf16 at 24 / 32 rows 5.64 / 5.86 vs 5.64 / 5.85.
const fp8WgAllRows = 32

// autoFP8OutSMs is the SMs the FP8 o and down products leave to the LoRA
// stream from autoQKVMinRows to autoWideRows rows: their updates (each
// o / down product's shrink and expand) ended 4-5 µs after the products
// on 16 SMs (PERFORMANCE v0.37). H200, four rank-32 adapters, 64 rows,
// device ms a step, q/k/v.o.gate_up.down holds (v0.41, two calls):
// 48.16.16.16 5.46 / 5.45, 48.32.16.32 5.38 / 5.37, 48.32.16.48 5.37,
// 48.48.16.48 5.36, 64.32.16.32 5.37, 48.24.16.24 5.46, 48.16.16.32 5.42;
// bf16 at 64 rows gains nothing from them (6.69-6.74 against 6.71).
const autoFP8OutSMs = 32

// Above autoWideRows rows each group's update outlasts its product by
// its own margin: TestLoRABesideBench at 256 rows (PERFORMANCE v0.34
// section 6) put each group's best at q/k/v 32, o 32, gate/up 16, down
// 24 SMs. In the step (PERFORMANCE v0.35, H200, four rank-32 adapters,
// device ms against 48 / 16 / 16 / 16): 96 rows 8.22 -> 7.98, 128 rows
// 8.34 both, 192 rows 10.52 -> 10.40, 256 rows 12.63 -> 12.42; 48 and 64
// rows within 0.3% either way, so they keep the narrower holds.
const autoWideRows = 64

var autoWideHolds = [4]int{32, 32, 16, 24}

// With FP8 weights the down product is half as long and its update
// outlasts it more: holding 32 SMs from it (PERFORMANCE v0.36, H200, four
// rank-32 adapters, device ms against 24): 128 rows 7.14-7.15 -> 7.02-7.05,
// 96, 192 and 256 rows within 0.2%.
var autoWideHoldsFP8 = [4]int{32, 32, 16, 32}

// From autoWideRows to fp8MidRows rows FP8 steps hold autoMidHoldsFP8:
// H200, four rank-32 adapters, device ms a step (PERFORMANCE v0.42, after
// the memsets became fill_rows): 128 rows 6.98 / 6.99 vs 7.10 / 7.12 with
// 32.32.16.32 (two calls), 96 rows 6.78 vs 6.84; at 256 rows 11.69 vs
// 11.57 and in mixed steps (64 decode rows and a 176-token prompt) 8.64
// vs 8.60, so wider steps keep autoWideHoldsFP8. As the default (v0.43,
// one call): 65 / 96 / 128 rows 6.04 / 6.79 / 6.96 vs 6.14 / 6.85 / 7.10.
const fp8MidRows = 128

var autoMidHoldsFP8 = [4]int{48, 32, 16, 32}

// Above fp8MidRows rows FP8 steps hold autoBigHoldsFP8: the gate/up
// update's expand (sgmv_expand_tc1 writing a float32 update of 28,672
// columns) on 16 SMs outlasted its product by ~9 µs a layer in mixed steps
// and silu_mul waited for it (PERFORMANCE v0.78's trace). H100, four
// rank-32 adapters, device ms a step, gate/up holding 16 / 20 / 24 / 28
// SMs (q/k/v, o, down 32 each; v0.78, one call): 160 rows 10.62 / 10.40 /
// 10.62 / 10.65, 256 rows 13.64 / 13.43 / 13.42 / 13.43, mixed steps (64
// decode rows and a 176-token prompt) 9.46 / 9.27 / 9.28 / 9.28; holding
// more from q/k/v or o (40.32.24.32, 48.48.16.48) lost.
var autoBigHoldsFP8 = [4]int{32, 32, 20, 32}

// Above fp8HugeRows rows (serving's mixed steps: ~60 decode rows beside a
// prompt, ~236 rows) FP8 steps hold autoHugeHoldsFP8: 48 SMs, not 32, from
// the o and down products. cuBLASLt runs those whole there (their 64
// output tiles of 128 x 128 cannot split K within one wave of the SMs
// left: fp8_split.go), so the product's blocks fit the smaller share
// and the down update (its shrink reads the 14,336-column input) gets
// more SMs. H200, four rank-32 adapters, device ms a step (PERFORMANCE
// v0.85, two calls): mixed steps (64 decode rows and a 176-token prompt)
// 6.64 / 6.64 against 6.72 / 6.73 (32.40.20.40, 32.32.20.64 and
// 32.64.20.64 the same, 32.64.20.32 6.74: the down hold is the gain), 256
// rows 10.45 against 10.48; 160 rows lose (8.54 against 8.31), so the
// rule starts above 192. On an H100 it is neutral: mixed steps 7.26
// against 7.25, 256 rows 12.77 against 12.78; serve8b FP8 with four
// adapters 9,219 / 9,174 tok/s against 8,990 / 9,207 off (two A/Bs; its
// mixed steps 7.19 / 7.26 ms against 7.29 / 7.26).
// PEFTD_LORA_FP8_HUGE_HOLDS=off keeps autoBigHoldsFP8 (autoHolds' huge
// false; the whole engine's A/B: serving).
const fp8HugeRows = 192

var autoHugeHoldsFP8 = [4]int{32, 48, 20, 48}

// hugeHoldsOff is PEFTD_LORA_FP8_HUGE_HOLDS=off (on by default).
func hugeHoldsOff() bool { return !envOnOff("PEFTD_LORA_FP8_HUGE_HOLDS", true) }

// The q/k/v product's SMs left to the LoRA stream in steps of
// autoQKVMinRows to autoWideRows rows (Options.LoRASMs automatic; above
// autoWideRows, autoWideHolds). Measured on the
// H200 with four rank-32 adapters (v0.32, device ms a step, 16 / 32 / 48
// SMs): bf16 64 rows 6.71 / 6.72 / 6.67, 128 rows 8.31 / 8.31 / 8.30, 256
// rows 12.92 / 12.72 / 12.72; FP8 64 rows 6.07 / 6.06 / 6.07, 128 rows
// 7.64 / 7.44 / 7.32, 256 rows 11.92 / 11.92 / 11.93.
const (
	autoQKVSMs     = 48
	autoQKVMinRows = 64
)

// groupOf is the index in llama.FusedGroups of the product with an n x k
// weight, by the model's shapes (the first that fits: o before down where
// the MLP is as wide as the attention output), or -1.
func (b *Backend) groupOf(n, k int) int {
	if b.cfg == nil {
		return -1
	}
	for g, mods := range llama.FusedGroups {
		in, out := 0, 0
		for _, m := range mods {
			i, o := b.cfg.Dims(m)
			in, out = i, out+o
		}
		if n == out && k == in {
			return g
		}
	}
	return -1
}

// weightShape is a projection weight's output and input widths (0, 0: not
// one of ours).
func weightShape(w engine.Weight) (n, k int) {
	switch w := w.(type) {
	case *weight:
		return w.rows, w.cols
	case *fp8Weight:
		return w.rows, w.cols
	}
	return 0, 0
}

// Linear: out = in @ W^T (bf16 in, float32 accumulate, bf16 out):
// gemm_skinny for a step of at most 16 rows whose shape it plans
// (bf16_skinny.go) unless SMs are held back for the LoRA stream, else
// cuBLASLt. For
// an FP8 weight, in's rows are quantized per token (once for consecutive
// projections of the same input) and fp8State.linear takes the product
// with both operands' row scales (fp8_gemv, fp8_stream or cuBLASLt's FP8
// GEMM by the rows).
func (b *Backend) Linear(out, in engine.Buffer, w engine.Weight) {
	b.join()
	if !b.ok() {
		return
	}
	b.wrote(out)
	if b.serialGroup(w) {
		b.la.forkIn = 0 // no fork: LoRA then runs the update in place after the product, which takes every SM
	} else {
		b.forkAt(buf(in))
	}
	if ws := b.wsFor(w); ws != nil {
		b.wsKernels(ws)
	}
	shared := false // the LoRA stream runs beside this product on SMs held back from it
	if base, _, ok := b.Partition(); ok {
		// the compute stream's green context has base SMs, the LoRA
		// stream its own: no product needs to leave room
		b.mm.SetSMTarget(base)
		defer b.mm.SetSMTarget(0)
	} else if sms := b.productSMs(w); b.la.forkIn != 0 && sms > 0 {
		shared = true
		target := max(1, b.ctx.Device().SMs-sms) // the SMs the product may take
		b.mm.SetSMTarget(target)
		defer b.mm.SetSMTarget(0)
		if wg := b.wgFor(w); wg != nil && !b.force.wgFull {
			wg.SetSMTarget(target)
			defer wg.SetSMTarget(0)
		}
		if ws := b.wsFor(w); ws != nil {
			ws.SetSMTarget(target)
			defer ws.SetSMTarget(0)
		}
		if _, ok := w.(*fp8Weight); ok && b.f8 != nil && b.f8.wgsk != nil {
			b.f8.wgsk.SetSMTarget(target)
			defer b.f8.wgsk.SetSMTarget(0)
		}
	}
	if fw, ok := w.(*fp8Weight); ok {
		o, x := buf(out), buf(in)
		if !b.check(x.cols == fw.cols && o.cols == fw.rows && o != x && o.whole() && x.whole(), "linear: in width %d, out width %d, fp8 weight [%d,%d]", x.cols, o.cols, fw.rows, fw.cols) {
			return
		}
		b.f8.shared, b.f8.room, b.f8.lone, b.f8.plain = shared, o.rows, b.la.forkIn == 0, !b.stepLoRA()
		b.fail(b.f8.linear(o.mem.Ptr(), x.mem.Ptr(), b.rows(), fw, b.gen))
		b.f8.shared, b.f8.room, b.f8.lone, b.f8.plain = false, 0, false, false
		return
	}
	o, x, wt := buf(out), buf(in), w.(*weight)
	if !b.check(x.cols == wt.cols && o.cols == wt.rows && o.whole() && x.whole(), "linear: in width %d, out width %d, weight [%d,%d]", x.cols, o.cols, wt.rows, wt.cols) {
		return
	}
	if b.bwsTakes(b.rows(), wt.rows, wt.cols, b.la.forkIn != 0) {
		if p, ok := b.bws.plan(b.rows(), wt.rows, wt.cols); ok {
			b.fail(b.bws.launch(b.s, p, o.mem.Ptr(), x.mem.Ptr(), 0, wt.mem.Ptr(), 0, b.rows(), wt.rows, wt.cols))
			return
		}
	}
	if p, ok := b.skinnyPlan(wt.rows, wt.cols, shared); ok {
		opts := bfSkinnyEarly
		if b.force.skLate {
			opts = 0
		}
		b.fail(b.sk.launch(b.s, p, o.mem.Ptr(), x.mem.Ptr(), wt.mem.Ptr(), b.rows(), wt.rows, wt.cols, opts))
		return
	}
	b.fail(b.mm.GemmTN(b.s, o.mem.Ptr(), cuda.R16BF, x.mem.Ptr(), cuda.R16BF, wt.mem.Ptr(), cuda.R16BF, b.rows(), wt.rows, wt.cols, 1, 0))
}

// bwsTakes is whether bwsMode routes a bf16 product of T rows x [N, K]
// to gemm_ws (where it plans: bws.plan), beside a LoRA update or not.
func (b *Backend) bwsTakes(T, N, K int, beside bool) bool {
	switch b.bwsMode() {
	case 1:
		return true
	case 2:
		return wsNarrow(N, K)
	case 3:
		return !beside
	case 4:
		return !beside || T <= bwsBesideRows
	}
	return false
}

// bwsMode is kernelForce.bws where set, else 4 (the products no LoRA
// update runs beside, and at most bwsBesideRows rows every product) where
// gemm_ws is on by default (bwsAuto), else 0.
// H200, bf16 decode, device ms a step (PERFORMANCE v0.68): base 32 / 64
// rows 5.33 / 6.13 -> 5.12 / 5.88 with gemm_ws where no LoRA update runs
// beside (3).
func (b *Backend) bwsMode() int {
	switch f := b.force.bws; {
	case f != 0:
		return f
	case b.bwsAuto:
		return 4
	}
	return 0
}

// bwsBesideRows is the most step rows whose products beside the LoRA
// stream run on gemm_ws by default: every row count gemm_ws plans (17-64).
// H200, bf16 decode, four rank-32 adapters, device ms a step at 24 / 32 /
// 48 / 64 rows (PERFORMANCE v0.69, session 77 call 2): cuBLASLt beside the
// stream 5.54 / 5.70 / 6.00 / 6.50, gemm_ws 5.40 / 5.56 / 6.12 / 6.56, so
// it was 32 until v0.84. H100 (v0.84, with the bf16 gate/up update,
// guHalf, and the LoRA kernels since): 48 / 64 rows 7.81 / 8.28 with
// cuBLASLt beside the stream, 7.64 / 8.12 with gemm_ws (-2.2 / -1.9%; the
// four adapters' ratio to base at 64 rows 0.905 -> 0.922). Not re-measured
// on an H200 since v0.69.
const bwsBesideRows = wsMaxRows

// skinnyPlan is gemm_skinny's plan for the step's product with an N x K
// weight on the whole card; ok false: cuBLASLt's product, also for a
// product that leaves SMs to the LoRA stream (shared: gemm_skinny's
// one-wave grids cover every SM).
func (b *Backend) skinnyPlan(N, K int, shared bool) (bfSkinnyPlan, bool) {
	if b.force.noSkinny || shared {
		return bfSkinnyPlan{}, false
	}
	return b.sk.plan(b.rows(), N, K)
}

// wgFor is the wgmma products that may take w's product: the FP8 ones for
// an FP8 weight (nil: none loaded, or a bf16 weight).
func (b *Backend) wgFor(w engine.Weight) *wgProduct {
	if _, ok := w.(*fp8Weight); ok && b.f8 != nil {
		return b.f8.wg
	}
	return nil
}

// wsFor is the ws products that may take w's product: fp8_ws for an FP8
// weight, gemm_ws for a bf16 one (nil: none loaded).
func (b *Backend) wsFor(w engine.Weight) *wsProduct {
	if _, ok := w.(*fp8Weight); ok {
		if b.f8 != nil {
			return b.f8.ws
		}
		return nil
	}
	return b.bws
}

// RoPE rotates q and k in place at the step's positions (the rotation
// Attention applies before it stores k; the op tests check it alone).
func (b *Backend) RoPE(q, k engine.Buffer, invFreq []float32, heads, kvHeads, headDim int) {
	b.ropeStore(buf(q), buf(k), nil, -1, invFreq, heads, kvHeads, headDim)
}

// ropeStore launches rope_store: q and k rotated in place and, for layer >=
// 0, k and v stored in that layer's cache at the step's KV slots
// (rope_store_rows where it fits; rope_store_lora where q/k/v's LoRA update
// was left unexpanded for it, lora_rope.go).
func (b *Backend) ropeStore(qb, kb, vb *Buffer, layer int, invFreq []float32, heads, kvHeads, headDim int) {
	var dq, dk, dv uint64 // LoRA updates of q, k, v from the LoRA stream
	ldd := 0
	var fold loraPend // an update to expand here (rope_store_lora, lora_rope.go)
	folded := false
	if vb != nil && layer >= 0 && headDim == b.cfg.HeadDim {
		fold, folded = b.takeQKV(qb, kb, vb)
	}
	half := false // the update is bf16 (qkvHalf): rope_store_rows_h / rope_store_h
	if vb != nil && !folded {
		if p, ld, h := b.fuseHalf(true, qb, kb, vb); p != nil {
			dq, dk, dv, ldd, half = p[0], p[1], p[2], ld, h
		}
	}
	b.opStart()
	if !b.ok() {
		return
	}
	if !b.check(qb.cols == heads*headDim && kb.cols == kvHeads*headDim && (invFreq == nil || len(invFreq) == headDim/2) && 4*len(invFreq) <= b.invFreq.Size(),
		"rope: widths %d, %d for %d/%d heads of %d", qb.cols, kb.cols, heads, kvHeads, headDim) {
		return
	}
	freq := b.freqTable(invFreq)
	var kc, vc, kc8, ks uint64
	ldv, ny := 0, heads+kvHeads
	if layer >= 0 {
		k, v, sc := b.layerCache(layer)
		vc = v
		if b.kv8 {
			kc8, ks = k, sc // rope_store quantizes the keys
		} else {
			kc = k
		}
		ldv, ny = vb.ld, heads+2*kvHeads
	}
	if folded { // a block per head and row
		b.ropeLoRALaunches++
		b.launch(b.fn.ropeLoRA, cuda.Dim3{X: ny, Y: b.rows()}, cuda.Dim3{X: headDim / 2},
			ptr(qb), ptr(kb), ptr(vb), kc, vc, freq, b.i32(b.off.pos), b.i32(b.off.kvSlots), b.rowLora(),
			heads, kvHeads, headDim, qb.ld, kb.ld, ldv, kc8, ks,
			b.stepTmp, b.table, fold.base, fold.stride, fold.ms[0], fold.ms[1], fold.ms[2], b.stepRank, fold.tStride, b.rows(), fold.ks, b.kv.BlockSize)
		return
	}
	args := []any{ptr(qb), ptr(kb), ptr(vb), kc, vc, freq, b.i32(b.off.pos), b.i32(b.off.kvSlots), dq, dk, dv, b.rowLora(),
		heads, kvHeads, headDim, qb.ld, kb.ld, ldv, ldd, kc8, ks, b.kv.BlockSize}
	rows, each := b.fn.ropeRows, b.fn.ropeStore
	if half {
		rows, each = b.fn.ropeRowsH, b.fn.ropeStoreH
		b.ropeHalfs++
	}
	if !b.force.ropeHeads && ropeRowsFit(headDim, []uint64{ptr(qb), ptr(kb), ptr(vb), dq, dk, dv}, []int{qb.ld, kb.ld, ldv, ldd}) {
		// a block per row: threads for every rotation unit (8 pairs) at once
		units := (heads + kvHeads) * headDim / 16
		b.launch(rows, cuda.Dim3{X: b.rows()}, cuda.Dim3{X: min(1024, max(64, (units+31)&^31))}, args...)
		return
	}
	threads := min(128, max(32, (headDim/2+31)&^31))
	b.launch(each, cuda.Dim3{X: b.rows(), Y: ny}, cuda.Dim3{X: threads}, args...)
}

// freqTable is the device copy of invFreq (uploaded when it changed; 0 for
// nil: no rotation).
func (b *Backend) freqTable(invFreq []float32) uint64 {
	if invFreq == nil {
		return 0
	}
	if !slices.Equal(b.invFreqHost, invFreq) {
		b.invFreqHost = append(b.invFreqHost[:0], invFreq...)
		b.fail(cuda.CopyHtoD(b.s, b.invFreq.Ptr(), b.invFreqHost))
	}
	return b.invFreq.Ptr()
}

// ropeRowsFit reports whether rope_store_rows takes a step: head_dim 64,
// 128 or 256, and 16-byte words of every row (its pointers, zero for
// none, 16-byte aligned; its row strides, in values, multiples of 8).
func ropeRowsFit(headDim int, ptrs []uint64, lds []int) bool {
	if headDim != 64 && headDim != 128 && headDim != 256 {
		return false
	}
	for _, p := range ptrs {
		if p%16 != 0 {
			return false
		}
	}
	for _, ld := range lds {
		if ld%8 != 0 {
			return false
		}
	}
	return true
}

// kscaleAt is the index, among one layer's FP8 key scales, of the scale of
// the key at cache slot slot and KV head kh, with bs slots a page: the
// layout [page][kvh][bs] of the kernels' kscale_at (llama.cu), which keeps
// a page's scales of one head contiguous for attn_decode8's tiles.
func kscaleAt(slot, kvh, kh, bs int) int {
	page := slot / bs
	return (page*kvh+kh)*bs + slot - page*bs
}

// layerCache is where layer's keys, values and (with an FP8 key cache, else
// 0) key scales are.
func (b *Backend) layerCache(layer int) (k, v, ks uint64) {
	k, v = b.kcache.Ptr()+uint64(layer*b.layerKB), b.vcache.Ptr()+uint64(layer*b.layerB)
	if b.kv8 {
		ks = b.kscale.Ptr() + uint64(layer*b.layerSB)
	}
	return k, v, ks
}

// Attention rotates q and k (RoPE at the step's positions; none for a nil
// invFreq), stores k and v at the step's KV slots (one kernel for the
// three), then attends each row over its sequence's pages (causal).
func (b *Backend) Attention(out, q, k, v engine.Buffer, layer int, scale float32, invFreq []float32) {
	if !b.ok() {
		return
	}
	o, qb, kb, vb := buf(out), buf(q), buf(k), buf(v)
	c := b.cfg
	width := b.kv.KVHeads * b.kv.HeadDim
	if !b.check(kb.cols == width && vb.cols == width && qb.cols == c.Heads*c.HeadDim && o.cols == qb.cols && o.whole() && layer >= 0 && layer < b.kv.Layers,
		"attention: widths q %d k %d v %d out %d, layer %d", qb.cols, kb.cols, vb.cols, o.cols, layer) {
		return
	}
	b.ropeStore(qb, kb, vb, layer, invFreq, c.Heads, b.kv.KVHeads, b.kv.HeadDim)
	kc, vc, ks := b.layerCache(layer)
	switch {
	case b.nPreTiles > 0: // the prefill rows (every row without decode sequences) on the tensor cores
		if b.err == nil {
			hd := b.kv.HeadDim
			b.fail(b.prefillKernel(hd).Launch(b.s, cuda.Dim3{X: b.nPreTiles, Y: c.Heads}, cuda.Dim3{X: preThreads}, preShared(hd, b.kv8),
				ptr(o), ptr(qb), kc, vc, b.i32(b.off.preTiles), b.i32(b.off.seqInfo), b.i32(b.off.pages),
				c.Heads, b.kv.KVHeads, b.kv.BlockSize, scale, qb.ld, ks))
		}
	case b.nDec == 0: // the per-row kernel for every row
		b.launch(b.fn.attention, cuda.Dim3{X: b.rows(), Y: c.Heads}, cuda.Dim3{X: 128}, ptr(o), ptr(qb), kc, vc,
			b.i32(b.off.rowSeq), b.i32(b.off.seqInfo), b.i32(b.off.pages), c.Heads, b.kv.KVHeads, b.kv.HeadDim, b.kv.BlockSize, scale, uint64(0), qb.ld, ks)
	case b.nPre > 0: // the per-row kernel for the prefill rows
		b.launch(b.fn.attention, cuda.Dim3{X: b.nPre, Y: c.Heads}, cuda.Dim3{X: 128}, ptr(o), ptr(qb), kc, vc,
			b.i32(b.off.rowSeq), b.i32(b.off.seqInfo), b.i32(b.off.pages), c.Heads, b.kv.KVHeads, b.kv.HeadDim, b.kv.BlockSize, scale,
			b.i32(b.off.preRows), qb.ld, ks)
	}
	if b.nDec == 0 {
		return
	}
	hd := b.kv.HeadDim
	var part uint64
	if b.decSplit > 1 || b.force.attnTS && b.part != nil { // attnTS: the PEFTD_ATTN_TS build's timestamps go there
		part = b.part.Ptr()
	}
	if b.err != nil {
		return
	}
	dv := b.decV
	grid, block := cuda.Dim3{X: b.nDec, Y: b.kv.KVHeads, Z: b.decSplit}, cuda.Dim3{X: 32 * dv.warps()}
	cluster := b.decCluster() && b.decSplit > 1
	opts := b.attnOpts() &^ decOptCluster
	if cluster {
		opts |= decOptCluster
	}
	if b.nPreTiles == 0 || b.kv8 { // late: only right after attn_prefill, bf16 keys
		opts &^= decOptLate
	}
	args := []any{ptr(o), part, b.attnDone, ptr(qb), kc, vc, b.i32(b.off.decSeqs), b.i32(b.off.pages),
		c.Heads, b.kv.KVHeads, b.kv.BlockSize, scale, b.decSplit, qb.ld, ks, opts}
	if cluster {
		b.fail(b.decodeKernel(hd, dv).LaunchCluster(b.s, grid, block, cuda.Dim3{X: 1, Y: 1, Z: b.decSplit}, decShared(hd, b.kv8, dv), args...))
		return
	}
	b.fail(b.decodeKernel(hd, dv).Launch(b.s, grid, block, decShared(hd, b.kv8, dv), args...))
}

// attn_decode's opts bits (llama.cu): decOptEarly, a warp's first tiles
// issued before griddepcontrol.wait when they do not hold the newest
// position; decOptMerge16, the splits merged with 16 loads in flight;
// decOptCluster, the splits of a (sequence, KV head) as one thread-block
// cluster of at most decClusterMax blocks (DEC_CLUSTER), merged through
// their shared memory (set by the step: decCluster and a split);
// decOptHeadMajor, the blocks in launch order a sequence's KV heads one
// after another (resident blocks read whole cache rows); decOptLate (bf16
// keys, set only where attn_prefill is the kernel before: a mixed step),
// no griddepcontrol.wait before the tiles: the decode blocks attend beside
// attn_prefill's and wait for it as they end (attn_decode_late).
const (
	decOptEarly     = 1
	decOptMerge16   = 2
	decOptCluster   = 4
	decOptHeadMajor = 16
	decOptLate      = 32
	decClusterMax   = 8
)

// decOptsDefault is attn_decode's opts unless kernelForce.decOpts says
// otherwise. v0.22 (H200, TestDecodeBench, one machine): early, merge16
// and clusters took batch 1 from 4.71 to 4.59 device ms a step (4 x r32:
// 4.95 to 4.80) and left 16, 64 and 256 within 0.2%. (RoPE and the K/V
// store inside attn_decode, v0.22's bit 3, was slower at 16 to 256 rows,
// batch 256 11.74 to 12.25 ms, and was removed in v0.23.)
// With FP8 keys the blocks also go head-major (decOptHeadMajor): H200,
// 64 rows, 4,096-token contexts, device ms a step (v0.53, call 2):
// 11.06 -> 11.00 (four rank-32 adapters 11.58 -> 11.51), and 10.98 ->
// 10.94 with the stages on 128-byte lines; v0.41 11.49 -> 11.37. 512-token
// contexts at 16 / 64 / 256 rows: 4.61 / 5.90 / 10.87 vs 4.63 / 5.91 /
// 10.85 (noise). bf16 keys gain nothing (4,096: 12.68 vs 12.71).
//
// decOptLate: mixed steps' decode rows beside the prompt's attention
// (PERFORMANCE v0.79).
const decOptsDefault = decOptEarly | decOptMerge16 | decOptCluster | decOptLate

// attnOpts is the opts attn_decode launches with: decOptsDefault (with
// decOptHeadMajor for FP8 keys), or kernelForce.decOpts (-1: none) for
// tests and benchmarks.
func (b *Backend) attnOpts() int {
	def := decOptsDefault
	if b.kv8 {
		def |= decOptHeadMajor
	}
	return forced(b.force.decOpts, def)
}

// decCluster reports whether attn_decode's splits run as clusters
// (attnOpts bit 2, on sm_90 and later).
func (b *Backend) decCluster() bool {
	return b.attnOpts()&decOptCluster != 0 && b.ctx.Device().Major >= 9
}

// prefillKernel is the attn_prefill variant for head dimension hd (32, 64
// or 128: preOK) and the backend's key cache.
func (b *Backend) prefillKernel(hd int) *cuda.Function {
	if b.kv8 {
		return b.fn.attnPrefill8[bits.TrailingZeros(uint(hd))-5]
	}
	return b.fn.attnPrefill[bits.TrailingZeros(uint(hd))-5]
}

// decodeKernel is attn_decode's kernel for head dimension hd (32, 64, 128
// or 256: decOK), the backend's key cache and variant v (decVariantFor).
func (b *Backend) decodeKernel(hd int, v decVariant) *cuda.Function {
	return b.decKernel(v, bits.TrailingZeros(uint(hd))-5)
}

// decKernel is variant v of attn_decode at head-dimension index i (32 << i)
// for the backend's key cache: attn_decode{,2,_w8}_d* with bf16 keys,
// attn_decode8{,_w2,_w8}_d* with FP8 keys; decV4's where v has none (8
// warps at head_dim 256).
func (b *Backend) decKernel(v decVariant, i int) *cuda.Function {
	four, two, eight := b.fn.attnDecode[i], b.fn.attnDecode2[i], b.fn.attnDecodeW8[:]
	if b.kv8 {
		four, two, eight = b.fn.attnDecode8[i], b.fn.attnDecode8W2[i], b.fn.attnDecode8W8[:]
	}
	switch {
	case v == decV2:
		return two
	case v == decV8 && i < len(eight) && b.decW8Fit[i]:
		return eight[i]
	}
	return four
}

// decVariant is one of attn_decode's kernel families, for either key
// format (decKernel): its warps a block (DEC_WARPS, DEC_WARPS2, DEC_WARPS8
// in llama.cu; each warp has DecShape's ST cp.async stages). Fewer warps
// take less shared memory, so more blocks fit an SM. (A variant of 4
// warps with 2 stages, 3 blocks an SM at head_dim 128, was slower at every
// batch in v0.24: 16 rows 4.71 -> 5.00 ms, 64 rows 6.07 -> 6.70.)
type decVariant int

const (
	decV4       decVariant = iota // attn_decode_d*: 4 warps
	decV2                         // attn_decode2_d*: 2 warps (a third of the shared memory: twice the blocks an SM)
	decV8                         // attn_decode_w8_d*: 8 warps (head_dim <= 128: one block an SM)
	decVariants                   // how many
)

// String names the variant in TestDecodeBench's rows: w4, w2, w8.
func (v decVariant) String() string { return fmt.Sprintf("w%d", v.warps()) }

// warps is the variant's warps a block.
func (v decVariant) warps() int {
	switch v {
	case decV2:
		return 2
	case decV8:
		return 8
	}
	return 4
}

// decStages is DecShape's cp.async stages a warp at head dimension hd
// (the same for every variant).
func decStages(hd int) int {
	if hd >= 256 {
		return 2
	}
	return 3
}

// decWarps2MinRows: decode steps of this many rows or more run
// attn_decode2 (bf16 keys). It holds twice the blocks an SM, so batch 64's
// 512 (sequence, KV head) blocks are one wave, not two. TestDecodeBench,
// H200, one call each (v0.23, v0.24): 64 rows 6.24 -> 6.13 and 6.25 ->
// 6.15 device ms, 256 rows 11.66 -> 11.60 and 11.77 -> 11.71; 16 rows
// 4.78 -> 5.07 and 4.79 -> 5.09, 1 row 4.26 -> 4.30 (4 warps fill a wave
// there, and each block's pipeline is longer with 2).
// Below it, bf16-key steps whose pairs are more than attn_decode's one
// wave and no more than attn_decode2's run attn_decode2 too (H200, 8B
// shapes: 34-63 rows; v0.58, one call, 48 rows, device ms, base / four
// rank-32 adapters: FP8 weights 4.58 / 5.19 -> 4.19 / 4.87, bf16 6.13 /
// 6.35 -> 5.74 / 6.01; 32 rows, one wave of attn_decode, 3.89 / 4.35 vs
// w2 3.91 / 4.39), 512-token prompts. 4,096-token prompts (v0.59, FP8
// weights, base): 40 / 48 rows 8.58 / 9.40 vs w4 9.08 / 9.66, but 56 rows
// 10.78 vs w4 10.57 (attn_decode with its K split; one measurement).
const decWarps2MinRows = 64

// decWarps8MinRows: decode steps of this many rows or more whose
// (sequence, KV head) pairs fit one wave of attn_decode_w8 (one block an
// SM; 5-16 rows at 8B shapes on an H200) run it: at 16 rows unsplit, where
// attn_decode splits each pair two ways and merges the halves as a
// cluster. TestDecodeBench, H200, 8B shapes, one call (v0.48), device ms
// w8 vs w4: 16 rows 4.66 vs 4.73 (four rank-32 adapters 5.04 vs 5.10), 8
// rows 4.45 vs 4.60 (4.79 vs 4.94); 2 rows 4.32 vs 4.23 (8 splits of 8
// warps: under one tile a warp). FP8 keys (attn_decode8_w8, v0.49): 8 rows
// 4.50 vs 4.66 (4.84 vs 5.01), 12 rows 4.65 vs 4.69, 16 rows 4.68 vs 4.72
// and 4.68 vs 4.73 (two calls); 4,096-token contexts at 64 rows stay on
// attn_decode8 (11.49 vs w8 11.89, w2 12.41).
const decWarps8MinRows = decW2SmallMax + 1

// decW2SmallMin to decW2SmallMax rows (the 4-row graph bucket) run
// attn_decode2 with either key format: 2 warps a block, many splits of a
// few tiles, merged as a cluster. H200, 8B shapes, device ms at 4 rows
// (v0.49, one call each), base / four rank-32 adapters: bf16 keys w2 4.42
// / 4.72 vs w8 4.49 / 4.82 (w4 4.51 / 4.82); FP8 keys w2 4.40 / 4.75 vs
// w4 4.52 / 4.83 and 4.40 vs 4.54. At 2 rows w4 is the fastest (bf16 4.29
// vs w2 4.35, FP8 keys 4.29 / 4.50 vs w2 4.30 / 4.57); at 8 rows w8.
const (
	decW2SmallMin = 3
	decW2SmallMax = 4
)

// decVariantFor is attn_decode's variant for a decode step (or graph
// bucket) of n rows: kernelForce.decVar's, else decV2 at
// decW2SmallMin-decW2SmallMax rows and (bf16 keys) from decWarps2MinRows
// or where its pairs need a second wave of decV4 and fit one of decV2,
// decV8 from decWarps8MinRows rows while their pairs fit one wave of it
// (where w8Fits the head dimension), else decV4.
func (b *Backend) decVariantFor(n int) decVariant {
	w8, pairs := b.w8(), n*b.kv.KVHeads // pairs: the step's (sequence, KV head) blocks before any split
	switch f := b.force.decVar; {
	case f > 0 && f <= int(decVariants) && (decVariant(f-1) != decV8 || w8):
		return decVariant(f - 1)
	case !b.kv8 && (n >= decWarps2MinRows || pairs > b.decResident[decV4] && pairs <= b.decResident[decV2]):
		return decV2
	case n >= decW2SmallMin && n <= decW2SmallMax:
		return decV2
	case w8 && n >= decWarps8MinRows && pairs <= b.decResident[decV8]:
		return decV8
	}
	return decV4
}

// decShared is the dynamic shared memory of attn_decode's variant v at
// head dimension hd: warps x stages x a 16-position tile of K and V (with
// FP8 keys: V, the e4m3 keys and their scales, and one bf16 K tile a warp:
// the widened keys, or with e4m3 Q K^T (attnQK8) room left empty to keep
// two blocks an SM; DecShape<HD, K8> in llama.cu). The end-of-block merge
// reuses it.
func decShared(hd int, k8 bool, v decVariant) int {
	warps, stages := v.warps(), decStages(hd)
	tile := 16 * hd * 2 // K or V rows of a 16-position tile, bf16
	if !k8 {
		return warps * stages * 2 * tile
	}
	return warps * (stages*(tile+16*hd+128) + tile) // the 16 scales padded to a 128-byte line
}

// decMergeFloats is the shared memory (in floats) attn_decode's merge
// area takes at the end of a block of warps warps, g query heads a KV head
// and head dimension hd, over the stage buffers (llama.cu, after the tiles'
// loop): the warps' partials wo [warps][g][hd] and their maxima and
// denominators, then 8 words, the block's partial for the cluster (cA
// [g][hd], its maxima cM [g], its denominators cL in 8 words), and the
// warps' merge weights hw [warps][8], hM [8] and hL [8]; or, without a
// cluster, the last block's counter (4 words) and merge weights [g][64].
func decMergeFloats(hd, warps, g int) int {
	return warps*g*hd + 2*warps*g + max(8+g*hd+g+8+8*warps+16, 4+64*g)
}

// preThreads, preRows are PRE_THREADS and PRE_ROWS in llama.cu; preShared(hd, k8)
// is the dynamic shared memory of attn_prefill_d{hd}: PreShape<hd, k8>::ST (2)
// stages of a 64-position tile of K and V (with FP8 keys, their e4m3 rows
// and scales too).
const (
	preThreads = 128
	preRows    = 64
)

func preShared(hd int, k8 bool) int {
	tile := 64 * hd * 2
	if k8 { // a stage: V, the e4m3 keys and their scales; one widened K tile
		return 2*(tile+64*hd+64*4) + tile
	}
	return 2 * 2 * tile
}

// siluCl and siluClWords are SILU_CL and SILU_CL_RC * 256 in llama.cu:
// silu_mul_cl's blocks a row, and the 16-byte words of a row a block holds.
// siluClRows is the most rows it takes by default: FP8 decode on an H200
// (v0.39, device ms a step, base / four rank-32 adapters, silu_mul_cl vs
// one block a row): 1 row 2.75 / 2.87 vs 2.83 / 2.96, 16 rows 3.52 / 3.91
// vs 3.58 / 4.04, 32 rows 4.01 / 4.60 vs 4.09 / 4.74, 64 rows 4.86 / 5.49
// vs 4.87 / 5.53; 128 rows 6.36 / 7.19 vs 6.22 / 7.04 (a block a row is
// enough blocks there).
const (
	siluCl      = 8
	siluClWords = 2 * 256
	siluClRows  = 64
)

// siluClFits reports whether this step's quantizing silu_mul runs as
// silu_mul_cl (a cluster of siluCl blocks a row) for rows cols wide: FP8
// steps of up to siluClRows rows on sm_90+, where one block a row reads
// the row alone (silu_mul added 5.3 µs a layer to the one-row FP8 chain,
// v0.39's trace).
func (b *Backend) siluClFits(cols int) bool {
	return forcedOn(b.force.siluCl, b.rows() <= siluClRows) && b.ctx.Device().Major >= 9 && cols%8 == 0 && cols/8 <= siluCl*siluClWords
}

// halfUpdate reports whether the update of group mods beside its product
// is written as bf16 (sgmv_expand_tch*, accHalf: the tensor-core expand,
// tc > 0, not the v2 kernels) for the op that reads it, each update then
// rounded to bf16 before the add (PEFT's bf16 lora_B output is too), by
// the group:
//   - gate/up (guHalf; SiLUMul reads it: silu_mul_h, _o2h, _clh):
//     kernelForce.guHalf 1 on, -1 off, 0 guHalfAuto. PERFORMANCE v0.80's
//     FP8 mixed-step trace: silu_mul_o2 waited 6.6 µs a layer for the
//     gate/up expand (1,176 blocks writing a float32 update of 28,672
//     columns on 20 held SMs), then read g, u and the two float32 updates
//     (41 MB at 240 rows) in 22.8 µs; bf16 updates halve the expand's
//     writes and take a third off silu_mul's reads.
//   - o, down (outHalf; AddRMSNorm reads it: add_rmsnorm_h, which at 1-16
//     rows stands in for add_rmsnorm_cl): kernelForce.outHalf 1 on, -1
//     off, 0 outHalfAuto with FP8 weights (bf16 steps keep float32
//     updates: with bf16 ones TestFixtureCoBatched's worst row is 0.0309,
//     past its 3e-2 bound, and bf16 decode gained nothing); 240-row FP8
//     mixed steps: 2 MB less each way a group and layer.
//   - q/k/v (qkvHalf; RoPE reads it: rope_store_rows_h, rope_store_h)
//     where RoPE does not expand it itself (ropeFold, 1-16 rows by
//     default, decides first): kernelForce.qkvHalf 1 on, -1 off, 0
//     qkvHalfAuto; 2.9 MB less each way a layer at 240 rows.
func (b *Backend) halfUpdate(mods []llama.Module, tc int) bool {
	if tc == 0 || b.force.loraV2 {
		return false
	}
	switch {
	case slices.Equal(mods, []llama.Module{llama.Gate, llama.Up}):
		return forcedOn(b.force.guHalf, b.guHalfOn)
	case slices.Equal(mods, []llama.Module{llama.O}), slices.Equal(mods, []llama.Module{llama.Down}):
		return forcedOn(b.force.outHalf, b.outHalfOn && b.f8 != nil)
	case slices.Equal(mods, []llama.Module{llama.Q, llama.K, llama.V}):
		return forcedOn(b.force.qkvHalf, b.qkvHalfOn)
	}
	return false
}

// outHalfAuto is kernelForce.outHalf's default for steps with FP8 weights:
// on since v0.86 (H100, four rank-32 adapters, FP8 device ms a step: 16
// rows 4.52-4.53 -> 4.41 in two calls, 1 row 3.61 -> 3.57, 4-256 rows and
// mixed steps within 0.3%; bf16, where halfUpdate keeps it off, 1 row
// 5.69 -> 5.67 and 16-256 rows the same).
const outHalfAuto = true

// qkvHalfAuto is kernelForce.qkvHalf's default: off (v0.86, H100, FP8
// with four rank-32 adapters: 16-256 rows and mixed steps within 0.3%,
// with outHalf or without).
const qkvHalfAuto = false

// qkvHalfDefault is qkvHalfAuto, or what PEFTD_LORA_QKV_HALF=on|off says
// (the whole engine's A/B).
func qkvHalfDefault() bool { return envOnOff("PEFTD_LORA_QKV_HALF", qkvHalfAuto) }

// outHalfDefault is outHalfAuto, or what PEFTD_LORA_OUT_HALF=on|off says
// (the whole engine's A/B: serving, and every test of the LoRA paths).
func outHalfDefault() bool { return envOnOff("PEFTD_LORA_OUT_HALF", outHalfAuto) }

// siluHalf is silu_mul kernel f, or its twin reading bf16 updates where
// half is set.
func (b *Backend) siluHalf(half bool, f *cuda.Function) *cuda.Function {
	if !half {
		return f
	}
	b.siluHalfs++
	switch f {
	case b.fn.siluMulO2:
		return b.fn.siluMulO2H
	case b.fn.siluMulCl:
		return b.fn.siluMulClH
	}
	return b.fn.siluMulH
}

// guHalfAuto is guHalf's default. PERFORMANCE v0.83 (H100, four rank-32
// adapters, device ms a step): FP8 mixed steps 7.47 -> 7.31, FP8 decode
// 16 / 64 / 256 rows -0.2 / -0.8 / -1.2%, bf16 64 / 256 rows -0.2 /
// -0.5%; serve8b with four adapters +0.8% (FP8) and +0.5% (bf16); every
// fixture within its limits, TestHalfUpdates' cases within 0.01 of the
// float32 update's error.
const guHalfAuto = true

// guHalfDefault is guHalfAuto, or what PEFTD_LORA_GU_HALF=on|off says (the
// whole engine's A/B: serving, and every test of the LoRA paths).
func guHalfDefault() bool { return envOnOff("PEFTD_LORA_GU_HALF", guHalfAuto) }

// siluMulFn is the kernel of the quantizing silu_mul with one 512-thread
// block a row: silu_mul, or silu_mul_o2 (at most 64 registers a thread, two
// blocks an SM) above fp8MidRows rows (kernelForce.siluO2: 1 at every row
// count, -1 at none). ncu (PERFORMANCE v0.79, H100, 256 rows) found
// silu_mul's 80 registers a thread fit one block an SM, two waves for 256
// rows. v0.80 (H100, device ms a step, base / four rank-32 adapters):
// mixed steps (64 rows + a 176-token prompt) 6.24 / 7.45 -> 6.17 / 7.38,
// 256 rows 11.84 / 13.00 -> 11.76 / 12.93; at 128 rows it lost, 7.89 /
// 8.43 -> 7.94 / 8.51.
func (b *Backend) siluMulFn() *cuda.Function {
	if forcedOn(b.force.siluO2, b.rows() > fp8MidRows) && b.fn.siluMulO2 != nil {
		return b.fn.siluMulO2
	}
	return b.fn.siluMul
}

// SiLUMul computes out = silu(gate) * up.
func (b *Backend) SiLUMul(out, gate, up engine.Buffer) {
	o, g, u := buf(out), buf(gate), buf(up)
	var dg, du uint64 // LoRA updates of gate and up from the LoRA stream
	ldd := 0
	p, ld, half := b.fuseHalf(true, g, u)
	if p != nil {
		dg, du, ldd = p[0], p[1], ld
	}
	b.opStart()
	if !b.ok() {
		return
	}
	if !b.check(o.cols == g.cols && g.cols == u.cols && o.whole() && g.ld == u.ld, "silu_mul: widths %d %d %d", o.cols, g.cols, u.cols) {
		return
	}
	vec := o.cols%8 == 0 && g.ld%8 == 0 && ldd%8 == 0
	// with FP8 projections the product (the down projection's input) is
	// quantized by the same kernel, one block per row, into the activation
	// scratch
	if vec && b.f8 != nil && b.f8.fits(b.rows(), o.cols) {
		if b.siluClFits(o.cols) {
			b.launchCluster(b.siluHalf(half, b.fn.siluMulCl), cuda.Dim3{X: b.rows() * siluCl}, cuda.Dim3{X: 256}, cuda.Dim3{X: siluCl},
				ptr(o), ptr(g), ptr(u), dg, du, b.rowLora(), o.cols, g.ld, ldd, b.f8.actQ.Ptr(), b.f8.actS.Ptr())
		} else {
			b.launch(b.siluHalf(half, b.siluMulFn()), cuda.Dim3{X: b.rows()}, cuda.Dim3{X: 512}, ptr(o), ptr(g), ptr(u), dg, du, b.rowLora(), b.rows(), o.cols, g.ld, ldd,
				b.f8.actQ.Ptr(), b.f8.actS.Ptr())
		}
		if b.err == nil {
			b.f8.holds(o.mem.Ptr(), b.rows(), o.cols, b.gen)
		}
		return
	}
	words := b.rows() * o.cols
	if vec {
		words /= 8
	}
	b.launch(b.siluHalf(half, b.fn.siluMul), cuda.Dim3{X: max(1, min((words+255)/256, 8192))}, cuda.Dim3{X: 256}, ptr(o), ptr(g), ptr(u), dg, du, b.rowLora(), b.rows(), o.cols, g.ld, ldd,
		uint64(0), uint64(0))
}

// Logits normalizes the LogitRows rows of x and projects them to float32 logits in out.
func (b *Backend) Logits(out, x engine.Buffer, norm, head engine.Weight, eps float32) {
	b.opStart()
	if !b.ok() {
		return
	}
	o, xb, nw, hw := buf(out), buf(x), norm.(*weight), head.(*weight)
	n := b.nLogit
	if n == 0 {
		return
	}
	if !b.check(hw.cols == xb.cols && nw.cols == xb.cols && o.cols == hw.rows && n <= o.rows && n <= b.maxT && o.whole() && xb.whole(),
		"logits: x width %d, norm %d, head [%d,%d], out width %d", xb.cols, nw.cols, hw.rows, hw.cols, o.cols) {
		return
	}
	if need := n * xb.cols * 2; b.normed == nil || b.normed.Size() < need {
		b.normed.Free()
		var err error
		if b.normed, err = b.ctx.Alloc(max(need, b.maxT*b.cfg.Hidden*2)); err != nil {
			b.fail(err)
			return
		}
	}
	if o.f32 == nil {
		var err error
		if o.f32, err = b.ctx.Alloc(o.rows * o.cols * 4); err != nil {
			b.fail(err)
			return
		}
	}
	o.isF32 = true
	b.launch(b.fn.rmsnormRows, cuda.Dim3{X: n}, cuda.Dim3{X: 256}, b.normed, xb.mem, b.i32(b.off.logitRows), nw.mem, eps, xb.cols)
	if b.err == nil {
		b.fail(b.mm.GemmTN(b.s, o.f32.Ptr(), cuda.R32F, b.normed.Ptr(), cuda.R16BF, hw.mem.Ptr(), cuda.R16BF, n, hw.rows, hw.cols, 1, 0))
	}
}

// Read waits for the step and copies the first rows of buf to dst as float32.
func (b *Backend) Read(x engine.Buffer, rows int, dst []float32) error {
	b.join()
	if b.err != nil {
		return b.err
	}
	xb := buf(x)
	n := rows * xb.cols
	if len(dst) < n || rows > xb.rows {
		return fmt.Errorf("gpu: read of %d rows of %d needs %d values, dst has %d", rows, xb.cols, n, len(dst))
	}
	if n == 0 {
		return nil
	}
	if err := b.markTail(); err != nil {
		return err
	}
	if err := b.markEnd(); err != nil {
		return err
	}
	size := 4 * n
	if b.readHost == nil || b.readHost.Size() < size {
		b.readHost.Free()
		var err error
		if b.readHost, err = b.ctx.AllocHost(max(size, 1<<20)); err != nil {
			return err
		}
	}
	var err error
	if xb.isF32 {
		err = cuda.CopyDtoH(b.s, b.readHost.Float32s()[:n], xb.f32.Ptr())
	} else {
		err = cuda.CopyDtoH(b.s, b.readHost.Uint16s()[:n], xb.mem.Ptr())
	}
	if err != nil {
		return err
	}
	if err := b.waitStep(); err != nil {
		return err
	}
	if xb.isF32 {
		copy(dst, b.readHost.Float32s()[:n])
	} else {
		for i, h := range b.readHost.Uint16s()[:n] {
			dst[i] = fromBF16(h)
		}
	}
	return nil
}

// End finishes the step, reporting the first error of any op.
func (b *Backend) End() error {
	if b.meta != nil {
		b.join()
	}
	b.endGates()
	err := b.err
	if err == nil {
		err = b.s.Synchronize()
	}
	b.meta = nil
	return err
}
