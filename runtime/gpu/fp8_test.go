package gpu

import (
	"slices"
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/llama"
)

func TestParseWeightFormat(t *testing.T) {
	for in, want := range map[string]string{"": WeightsBF16, "bf16": WeightsBF16, "FP8": WeightsFP8, " fp8 ": WeightsFP8, "e4m3": WeightsFP8} {
		if got, err := ParseWeightFormat(in); err != nil || got != want {
			t.Errorf("%q: %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := ParseWeightFormat("int4"); err == nil {
		t.Error("int4 accepted")
	}
}

func TestFP8Projection(t *testing.T) {
	for _, c := range []struct {
		name  string
		shape []int
		want  bool
	}{
		{"model.layers.0.self_attn.q_proj.weight", []int{4096, 4096}, true},
		{"model.layers.31.mlp.down_proj.weight", []int{4096, 14336}, true},
		{"model.layers.0.self_attn.k_proj.weight", []int{100, 4096}, false}, // N % 8
		{"model.layers.0.mlp.up_proj.weight", []int{352, 120}, false},       // K % 16
		{"model.embed_tokens.weight", []int{128256, 4096}, false},
		{"lm_head.weight", []int{128256, 4096}, false},
		{"model.layers.0.input_layernorm.weight", []int{4096}, false},
	} {
		if got := fp8Projection(c.name, c.shape); got != c.want {
			t.Errorf("%s %v: %v, want %v", c.name, c.shape, got, c.want)
		}
	}
}

// TestGemvFits: fp8_gemv takes 1-16 rows when K is a multiple of 64 and N
// of 16; everything else goes to cuBLASLt.
func TestGemvFits(t *testing.T) {
	for _, c := range []struct {
		T, N, K int
		want    bool
	}{{1, 4096, 4096, true}, {16, 28672, 4096, true}, {17, 4096, 4096, false}, {0, 4096, 4096, false},
		{4, 4096, 14336, true}, {4, 100, 4096, false}, {4, 96, 272, false}, {8, 16, 64, true}} {
		if got := gemvFits(c.T, c.N, c.K); got != c.want {
			t.Errorf("gemvFits(%d, %d, %d) = %v, want %v", c.T, c.N, c.K, got, c.want)
		}
	}
}

// TestPlanSeg: fp8_gemv_seg's plans on the 8B shapes are the gemvlab's
// fastest (or within 2%): one row S 8 in 4-warp blocks at K = 4,096 and 4
// warps of 7 chunks at 14,336; two rows S 4; 3-4 rows S 2; none for 5+
// rows or shapes no chunk divides.
func TestPlanSeg(t *testing.T) {
	for _, c := range []struct {
		M, N, K int
		ok      bool
		S, CH   int
		KS, G   int
	}{
		{1, 6144, 4096, true, 8, 4, 2, 2}, {1, 28672, 4096, true, 8, 4, 2, 2}, {1, 4096, 14336, true, 8, 7, 4, 1},
		{2, 4096, 4096, true, 4, 4, 4, 1}, {2, 4096, 14336, true, 4, 7, 8, 1},
		{3, 6144, 4096, true, 2, 4, 8, 1}, {4, 4096, 14336, true, 2, 7, 16, 1},
		{1, 2048, 2048, true, 8, 4, 1, 4}, {1, 3072, 3072, true, 8, 2, 3, 1}, {1, 4, 4096, true, 8, 4, 2, 2}, {1, 3, 4096, false, 0, 0, 0, 0},
		{1, 8, 2048, true, 8, 4, 1, 4}, {1, 2, 2048, true, 8, 4, 1, 1}, {2, 4, 1024, true, 4, 4, 1, 1},
		{5, 4096, 4096, false, 0, 0, 0, 0}, {0, 4096, 4096, false, 0, 0, 0, 0}, {1, 4096, 18944, false, 0, 0, 0, 0},
		{1, 4096, 64, false, 0, 0, 0, 0}, {4, 4096, 3584, true, 2, 7, 4, 1},
	} {
		p, ok := planSeg(c.M, c.N, c.K)
		if ok != c.ok || ok && (p.k.S != c.S || p.k.CH != c.CH || p.KS != c.KS || p.G != c.G) {
			t.Errorf("planSeg(%d, %d, %d) = %+v, %v; want S %d CH %d KS %d G %d, %v", c.M, c.N, c.K, p, ok, c.S, c.CH, c.KS, c.G, c.ok)
		}
		// fp8_gemv_seg_body gives each output of a block one thread
		// (thread i writes output i / RB, i % RB): no more outputs than
		// threads
		if ok && p.rows()*c.M > 32*p.KS*p.G {
			t.Errorf("planSeg(%d, %d, %d) = %+v: %d outputs a block for %d threads", c.M, c.N, c.K, p, p.rows()*c.M, 32*p.KS*p.G)
		}
	}
}

// TestGemvWarpsFor: 16 warps for the small grids (8B o and down on 132
// SMs), 8 for the large ones.
func TestGemvWarpsFor(t *testing.T) {
	for _, c := range []struct{ N, sms, want int }{
		{4096, 132, 16}, {6144, 132, 8}, {28672, 132, 8}, {4096, 100, 8}, {1024, 8, 8}, {240, 8, 16},
	} {
		if got := gemvWarpsFor(c.N, c.sms); got != c.want {
			t.Errorf("gemvWarpsFor(N=%d, %d SMs) = %d, want %d", c.N, c.sms, got, c.want)
		}
	}
}

func TestSkinnyFits(t *testing.T) {
	for _, c := range []struct {
		T, N, K int
		want    bool
	}{{17, 4096, 4096, true}, {64, 28672, 4096, true}, {16, 4096, 4096, false}, {65, 4096, 4096, false},
		{32, 4096 + 16, 4096, false}, {32, 4096, 4096 + 16, false}, {32, 64, 64, true}} {
		if got := skinnyFits(c.T, c.N, c.K, 64); got != c.want {
			t.Errorf("skinnyFits(%d, %d, %d, 64) = %v, want %v", c.T, c.N, c.K, got, c.want)
		}
		// the automatic choice sends it nothing (cuBLASLt was faster)
		if skinnyFits(c.T, c.N, c.K, skinnyAutoRows) {
			t.Errorf("skinnyFits(%d, %d, %d, auto) = true, want false", c.T, c.N, c.K)
		}
	}
	// up to 128 rows when a benchmark asks, never more
	for _, c := range []struct {
		T    int
		want bool
	}{{65, true}, {128, true}, {129, false}, {16, false}} {
		if got := skinnyFits(c.T, 4096, 4096, 1<<20); got != c.want {
			t.Errorf("skinnyFits(%d, 4096, 4096, any) = %v, want %v", c.T, got, c.want)
		}
	}
	if skinnyVariants[len(skinnyVariants)-1].rows != skinnyMaxRows || skinnyAutoRows > skinnyMaxRows {
		t.Errorf("variants %v, auto %d, max %d", skinnyVariants, skinnyAutoRows, skinnyMaxRows)
	}
	for _, v := range skinnyVariants {
		if sh := skinnyShared(v.rows); sh > 227<<10 {
			t.Errorf("%s: %d bytes of shared memory, over Hopper's 227 KB per block", v.name, sh)
		}
	}
}

// TestSkinnySplit: K is split only for grids under two blocks per SM, into
// at most 8 parts of at least 4 spans; tiles * split stays under the bound
// the partials are sized for.
func TestSkinnySplit(t *testing.T) {
	for _, c := range []struct{ N, K, sms, want int }{
		{4096, 4096, 132, 5}, {4096, 14336, 132, 5}, {6144, 4096, 132, 3}, {28672, 4096, 132, 1},
		{256, 4096, 132, 8}, {128, 64, 132, 1}, {192, 512, 132, 2}, {16896, 4096, 132, 1}, {64, 4096, 1, 2},
	} {
		got := skinnySplit(c.N, c.K, c.sms, 2)
		if got != c.want {
			t.Errorf("skinnySplit(N=%d, K=%d, %d SMs) = %d, want %d", c.N, c.K, c.sms, got, c.want)
		}
		if bytes := c.N / skinnyRows * got * skinnyRows * skinnyMaxRows * 4; bytes > skinnyPartBytes(c.sms) {
			t.Errorf("N=%d K=%d %d SMs: partials of %d bytes over the %d reserved", c.N, c.K, c.sms, bytes, skinnyPartBytes(c.sms))
		}
	}
	for sms := 1; sms <= 200; sms++ { // the bound for every tile count
		for tiles := 1; tiles <= 4*sms; tiles++ {
			S := max(skinnySplit(tiles*skinnyRows, 1<<16, sms, 2), skinnySplit(tiles*skinnyRows, 1<<16, sms, 1))
			if tiles*S*skinnyRows*skinnyMaxRows*4 > skinnyPartBytes(sms) {
				t.Fatalf("%d SMs, %d tiles: split %d exceeds the partials", sms, tiles, S)
			}
		}
	}
}

// TestSplitSMs: products beside the LoRA stream plan their K split for the
// SMs left to them, except in 129-192-row steps (splitBesideRows); the
// down product's split follows.
func TestSplitSMs(t *testing.T) {
	const h200, target = 132, 100
	for _, c := range []struct {
		name          string
		T, target     int
		shared, all   bool
		wantSMs, down int
	}{
		{"no LoRA stream", 192, 0, false, false, h200, 2},
		{"target, not beside the stream", 192, target, false, false, target, 1},
		{"128 rows beside", 128, target, true, false, target, 2},
		{"129 rows beside", 129, target, true, false, h200, 2},
		{"192 rows beside", 192, target, true, false, h200, 2},
		{"193 rows beside", 193, target, true, false, target, 1},
		{"256 rows beside", 256, target, true, false, target, 1},
		{"256 rows, every row count forced", 256, target, true, true, h200, 2},
		{"128 rows, every row count forced", 128, target, true, true, h200, 4},
	} {
		got := splitSMs(c.T, h200, c.target, c.shared, c.all)
		if got != c.wantSMs {
			t.Errorf("%s: splitSMs = %d, want %d", c.name, got, c.wantSMs)
		}
		if s := splitFor(c.T, 4096, 14336, got); s != c.down {
			t.Errorf("%s: down split %d ways, want %d", c.name, s, c.down)
		}
	}
}

func TestSplitFor(t *testing.T) {
	const h200 = 132
	for _, c := range []struct {
		name      string
		T, N, K   int
		sms, want int
	}{
		{"fp8_gemv's rows", 16, 4096, 14336, h200, 1},
		{"down, 17 rows", 17, 4096, 14336, h200, 4}, // 32 tiles
		{"down, 64 rows", 64, 4096, 14336, h200, 4},
		{"o, 64 rows", 64, 4096, 4096, h200, 4},
		{"qkv, 64 rows", 64, 6144, 4096, h200, 2},      // 48 tiles: 4 slices would be 192 blocks
		{"gate_up, 64 rows", 64, 28672, 4096, h200, 1}, // 224 tiles already
		{"down, 129 rows", 129, 4096, 14336, h200, 2},  // 64 tiles
		{"down, 256 rows", 256, 4096, 14336, h200, 2},
		{"qkv, 256 rows", 256, 6144, 4096, h200, 1},
		{"past splitMaxRows", 257, 4096, 14336, h200, 1},
		{"K of one tile", 64, 4096, 128, h200, 1},
		{"K of two tiles", 64, 1024, 256, h200, 2},
		{"N not a multiple of 4", 64, 4098, 4096, h200, 1},
		{"SM target 99", 64, 4096, 4096, 99, 2}, // 32 tiles x 4 > 99
		{"partials over the buffer", 256, 8196, 4096, h200 * 4, 1},
		{"no SM count", 64, 4096, 4096, 0, 1},
	} {
		if got := splitFor(c.T, c.N, c.K, c.sms); got != c.want {
			t.Errorf("%s: splitFor(%d, %d, %d, %d) = %d, want %d", c.name, c.T, c.N, c.K, c.sms, got, c.want)
		}
		if got := splitFor(c.T, c.N, c.K, c.sms); got > 1 && (c.K%(16*got) != 0 || 4*got*c.T*c.N > splitPartBytes) {
			t.Errorf("%s: split %d does not fit K %d or the partials' buffer", c.name, got, c.K)
		}
	}
}

// TestWgShared: wg_body's stages start on the 1024-byte boundaries its
// 128-byte swizzle needs (the base is rounded up; every stage is a whole
// number of 1 KB), and a block of the default build fits an sm_90 SM (227
// KB of shared memory a block at most, 1.1 KB static).
func TestWgShared(t *testing.T) {
	for _, v := range skinnyVariants {
		if stage := (skinnyRows + v.rows) * wgRowBytes; stage%1024 != 0 {
			t.Errorf("%d rows: a stage of %d bytes is not a multiple of 1024", v.rows, stage)
		}
		if per := wgShared(v.rows) + 1152; per > 227<<10 {
			t.Errorf("%d rows: a block of %d bytes does not fit an sm_90 SM", v.rows, per)
		}
	}
	// the default's atoms a stage (WG_KA 4, one block an SM: 199 KB of
	// stages): 4 where three stages of 4 fit, else as many as do
	if wgKA != 4 || wgPerSM != 1 {
		return // an A/B build (PEFTD_KERNEL_DEFINES)
	}
	want := map[int]int{32: 4, 64: 4, 128: 2} // rows: atoms (common.cuh's static_assert)
	for rows, w := range want {
		if got := wgAtoms(rows); got != w {
			t.Errorf("%d rows: %d atoms a stage, want %d", rows, got, w)
		}
		if st := wgStages(rows); st < 3 || st*wgStageBytes(rows) > wgSmem() {
			t.Errorf("%d rows: %d stages of %d bytes in %d", rows, st, wgStageBytes(rows), wgSmem())
		}
	}
}

// TestWgAutoFits: Options.FP8Wgmma's routing at the 8B projection shapes
// (qkv 6144 x 4096, o 4096 x 4096, gate_up 28672 x 4096, down 4096 x 14336).
func TestWgAutoFits(t *testing.T) {
	qkv, o, gateUp, down := [2]int{6144, 4096}, [2]int{4096, 4096}, [2]int{28672, 4096}, [2]int{4096, 14336}
	for _, c := range []struct {
		T      int
		shape  [2]int
		shared bool
		want   bool
	}{
		{16, gateUp, false, false}, {16, qkv, true, false}, // fp8_gemv and fp8_stream's rows
		{17, qkv, false, true}, {32, o, false, true}, {32, down, false, true}, {24, gateUp, false, true},
		{33, gateUp, false, true}, {64, gateUp, false, true}, {64, qkv, false, false}, {64, o, false, false}, {64, down, false, false},
		{64, qkv, true, true}, {48, down, true, true},
		{65, gateUp, false, false}, {65, gateUp, true, false}, {256, qkv, true, false},
	} {
		if got := wgAutoFits(c.T, c.shape[0], c.shape[1], c.shared); got != c.want {
			t.Errorf("wgAutoFits(%d, %d, %d, shared %v) = %v, want %v", c.T, c.shape[0], c.shape[1], c.shared, got, c.want)
		}
	}
}

// TestScaledRows: scaled FP8 products of 33-511 rows are asked for the next
// multiple of 128 rows where the output holds them (TestFP8ScaledPadding
// checks the products on a GPU).
func TestScaledRows(t *testing.T) {
	for _, c := range []struct{ T, room, want int }{
		{1, 512, 1}, {32, 512, 32}, {33, 512, 128}, {64, 512, 128}, {64, 127, 64}, {127, 128, 128}, {128, 256, 128}, {129, 512, 256}, {192, 256, 256}, {129, 200, 129},
		{193, 512, 256}, {255, 256, 256}, {256, 512, 256}, {257, 512, 384}, {320, 512, 384}, {320, 383, 320}, {384, 512, 384},
		{385, 512, 512}, {448, 512, 512}, {448, 500, 448}, {511, 4096, 512}, {512, 512, 512}, {513, 4096, 513}, {600, 4096, 600}, {192, 0, 192},
	} {
		if got := scaledRowsFrom(c.T, c.room, scaledPadFrom); got != c.want {
			t.Errorf("scaledRowsFrom(%d, %d, %d) = %d, want %d", c.T, c.room, scaledPadFrom, got, c.want)
		}
	}
}

// TestFP8StateScaledRows: the benchmark knobs' rules (padOff: none; padOld:
// v0.43's, 129-255 rows to 256) and the default (scaledRowsFrom).
func TestFP8StateScaledRows(t *testing.T) {
	for _, c := range []struct {
		off, old      bool
		T, room, want int
	}{
		{false, false, 64, 512, 128}, {false, false, 320, 512, 384}, {true, false, 192, 512, 192},
		{false, true, 64, 512, 64}, {false, true, 192, 512, 256}, {false, true, 192, 200, 192}, {false, true, 320, 512, 320},
	} {
		f := &fp8State{padOff: c.off, padOld: c.old, room: c.room}
		if got := f.scaledRows(c.T); got != c.want {
			t.Errorf("padOff %v padOld %v: scaledRows(%d) with room %d = %d, want %d", c.off, c.old, c.T, c.room, got, c.want)
		}
	}
}

// TestWsShape: fp8_ws's stages (WsShape in kernels/common.cuh) are whole
// swizzle atoms, at least three, and a block fits an sm_90 SM.
func TestWsShape(t *testing.T) {
	for _, es := range []int{1, 2} {
		for _, bn := range wsWidths {
			if ab := (wsMaxRows + bn) * wsAtom; ab%1024 != 0 {
				t.Errorf("n%d: an atom of %d bytes is not a multiple of 1024", bn, ab)
			}
			if st := wsStages(bn, es); st < 3 || st > 16 || st*wsStageBytes(bn, es) > wsSmem-1024 {
				t.Errorf("n%d, %d-byte operands: %d stages of %d bytes", bn, es, st, wsStageBytes(bn, es))
			}
			// the system's 1 KB a block, the scales' copies (ws_body's wsc,
			// xsc) and the split counter
			if per := wsShared(bn, es) + 1024 + 4*(bn+wsMaxRows) + 16; per > 227<<10 {
				t.Errorf("n%d, %d-byte operands: a block of %d bytes does not fit an sm_90 SM", bn, es, per)
			}
		}
	}
}

// TestWs16Shape: the 16-row kernels' stages (WsShape<bn, 1, false, 16>)
// at the default WS16_KA: whole swizzle atoms, at least three, the 64-row
// A read of the last atom inside the allocation, a block within an sm_90
// SM; and the widths' KA, stages and bytes as worked out by hand.
func TestWs16Shape(t *testing.T) {
	want := map[int]struct{ ka, st, shared int }{
		32:  {4, 8, 8*4*48*128 + 2048 + 1024}, // 48-row atoms: the A read goes 2 KB past the last
		48:  {4, 6, 6*4*64*128 + 1024},
		64:  {4, 4, 4*4*80*128 + 1024},
		96:  {4, 3, 3*4*112*128 + 1024},
		128: {2, 5, 5*2*144*128 + 1024}, // four atoms leave two stages
	}
	for bn, w := range want {
		if ab := (ws16Rows + bn) * wsAtom; ab%1024 != 0 {
			t.Errorf("n%d: a 16-row atom of %d bytes is not a multiple of 1024", bn, ab)
		}
		ka, st := ws16KAFor(bn), ws16Stages(bn)
		if st < 3 || st > 16 {
			t.Errorf("n%d: %d stages", bn, st)
		}
		sb := ka * (ws16Rows + bn) * wsAtom
		if end := (st-1)*sb + (ka-1)*(ws16Rows+bn)*wsAtom + wsMaxRows*wsAtom; end > ws16Shared(bn)-1024 {
			t.Errorf("n%d: the last atom's A read ends at %d, past the %d bytes after the alignment", bn, end, ws16Shared(bn)-1024)
		}
		if per := ws16Shared(bn) + 1024 + 4*(bn+ws16Rows) + 16; per > 227<<10 {
			t.Errorf("n%d: a block of %d bytes does not fit an sm_90 SM", bn, per)
		}
		if ws16KA == 4 && (ka != w.ka || st != w.st || ws16Shared(bn) != w.shared) {
			t.Errorf("n%d: KA %d, %d stages, %d bytes; want %d, %d, %d", bn, ka, st, ws16Shared(bn), w.ka, w.st, w.shared)
		}
	}
	// the 16-row half-row kernels: two atoms of 16 activation rows and
	// bn / 2 weight rows a stage, as many as WSH_SMEM holds (n224: 7, not
	// fp8_wsh's 5), the 64-row A read inside each 128-row-or-more atom,
	// the dynamic shared memory within the card's 227 KB
	for bn, st := range map[int]int{224: 7, 256: 6} {
		if ab := (ws16Rows + bn/2) * wsAtom; ab%1024 != 0 || ab < wsMaxRows*wsAtom {
			t.Errorf("wsh16 n%d: an atom of %d bytes", bn, ab)
		}
		if got := wsh16Stages(bn); got != st || wsh16Shared(bn) > 227<<10 {
			t.Errorf("wsh16 n%d: %d stages (want %d), %d bytes", bn, got, st, wsh16Shared(bn))
		}
	}
}

// ws16Product is an FP8 wsProduct on 132 SMs for the plan tests: every
// width's kernel and the 16-row kernels of 32-128 "loaded" (never
// launched), rows16 on.
func ws16Product() *wsProduct {
	g := &wsProduct{esize: 1, sms: 132, rows16: true}
	for i := range wsWidths {
		g.fn[i] = &cuda.Function{}
		if wsWidths[i] <= 128 {
			g.f16[i] = &cuda.Function{}
		}
	}
	return g
}

// TestWs16Valid: with the 16-row kernels on, a plan of 1-16 rows needs K
// in whole stages of both kernels; above 16 rows only the 64-row one's.
func TestWs16Valid(t *testing.T) {
	g := ws16Product()
	i32 := 0 // n32: 256-byte stages at TR 64 (WS_KA 2), 512 at TR 16 (WS16_KA 4)
	for _, c := range []struct {
		T, K, split int
		want        bool
	}{
		{16, 4096, 1, true}, {16, 4096, 8, true}, {16, 3840, 1, ws16KAFor(32)*wsAtom <= 256}, {17, 3840, 1, true},
		{16, 4096, 16, false}, {1, 512, 1, true}, {16, 256, 1, ws16KAFor(32)*wsAtom <= 256},
	} {
		if got := g.valid(wsPlan{i: i32, split: c.split}, c.T, 4096, c.K); got != c.want {
			t.Errorf("n32x%d, %d rows, K %d: valid %v, want %v", c.split, c.T, c.K, got, c.want)
		}
	}
	g.rows16 = false
	if !g.valid(wsPlan{i: i32, split: 1}, 16, 4096, 3840) {
		t.Error("n32x1, 16 rows, K 3840 with the 16-row kernels off: not valid")
	}
}

// TestWsPlan: fp8_ws's and gemm_ws's plans at the 8B projection shapes:
// one wave of the SM target, the most blocks, then the fewest splits
// unless a block of under 64 weight rows would stream more than 8 KB of K
// (wsShortRows); the rows it takes; shapes no kernel divides.
func TestWsPlan(t *testing.T) {
	for _, c := range []struct {
		esize, T, N, K, target int
		want                   string // "": none
		from                   int    // planFrom's fewest rows (0: plan, wsMinRows)
	}{
		{1, 64, 28672, 4096, 0, "n224x1", 0},
		{1, 64, 6144, 4096, 0, "n48x1", 0},
		{1, 64, 4096, 4096, 0, "n32x1", 0},
		{1, 64, 4096, 14336, 0, "n64x2", 0}, // 14 KB of K a block at n32
		{2, 64, 6144, 4096, 0, "n48x1", 0},  // 8 KB: not more
		{2, 64, 4096, 4096, 0, "n32x1", 0},
		{2, 64, 4096, 14336, 0, "n64x2", 0},
		{2, 64, 28672, 4096, 0, "n224x1", 0},
		{1, 17, 28672, 4096, 116, "n256x1", 0}, // beside the LoRA stream: 112 blocks
		{1, 64, 4096, 4096, 84, "n64x1", 0},
		{1, 16, 28672, 4096, 0, "", 0},
		{1, 65, 28672, 4096, 0, "", 0},
		{1, 64, 4104, 4096, 0, "", 0},
		{1, 64, 4096, 4000, 0, "", 0},
		{1, 16, 28672, 4096, 0, "n224x1", 9}, // fp8State.wsFrom's A/Bs: the 64-row plan
		{1, 1, 4096, 14336, 0, "n64x2", 1},
		{1, 8, 4096, 4096, 0, "", 9},
		{1, 0, 4096, 4096, 0, "", 1},
	} {
		g := &wsProduct{esize: c.esize, sms: 132}
		for i := range g.fn {
			g.fn[i] = &cuda.Function{}
		}
		g.target = c.target
		p, ok := g.plan(c.T, c.N, c.K)
		if c.from > 0 {
			p, ok = g.planFrom(c.T, c.N, c.K, c.from)
		}
		got := ""
		if ok {
			got = p.String()
			if blocks := c.N / wsWidths[p.i] * p.split; blocks > g.sms || (c.target > 0 && blocks > c.target) {
				t.Errorf("%d x %d x %d (target %d): plan %v is %d blocks", c.T, c.N, c.K, c.target, p, blocks)
			}
		}
		if got != c.want {
			t.Errorf("%d x %d x %d: plan %q, want %q", c.T, c.N, c.K, got, c.want)
		}
	}
}

// TestWsFusedPlans: at the 8B shapes and 17-64 rows, on 132 SMs (H100,
// H200) and 114 (H100 PCIe), the plans the fused ws kernels need: o and
// down's plans have a NORM kernel (gemm_ws_norm_n*, fp8_ws_norm_n*:
// widths 32 and 64, no more blocks than SMs); gate/up's plan with the
// half-row kernels on is one of theirs (224 or 256, its K whole two-atom
// stages) and unchanged by them; the half-row kernels have as many stages
// as the one-atom ones (five 44 KB stages at 224) within the card's 227 KB
// beside their static arrays; and neither a partition-sized SM target nor a missing kernel
// makes a plan claim one (normFits, halfOn false).
func TestWsFusedPlans(t *testing.T) {
	const maxShared = 232448 // sm_90's per-block opt-in limit
	for _, esize := range []int{1, 2} {
		for _, sms := range []int{132, 114} {
			g := &wsProduct{esize: esize, sms: sms, nsync: &cuda.DeviceBuffer{}}
			for i, bn := range wsWidths {
				g.fn[i] = &cuda.Function{}
				switch bn {
				case 32, 64:
					g.nfn[i] = &cuda.Function{}
				case 224, 256:
					g.hfn[i], g.hsfn[i] = &cuda.Function{}, &cuda.Function{}
				}
			}
			for _, T := range []int{17, 24, 32, 48, 64} {
				for _, sh := range [][2]int{{4096, 4096}, {4096, 14336}} {
					N, K := sh[0], sh[1]
					p, ok := g.plan(T, N, K)
					if !ok || !g.normFits(p, N) {
						t.Errorf("esize %d, %d SMs: %d x %d x %d: plan %v (ok %v) has no NORM kernel", esize, sms, T, N, K, p, ok)
					}
				}
				g.half = false
				one, ok1 := g.plan(T, 28672, 4096)
				g.half = true
				half, ok2 := g.plan(T, 28672, 4096)
				if !ok1 || !ok2 || one != half || !g.halfOn(half.i) {
					t.Errorf("esize %d, %d SMs: %d x 28672 x 4096: plan %v, with the half-row kernels %v (half-row %v)", esize, sms, T, one, half, ok2 && g.halfOn(half.i))
				}
				g.half = false
			}
		}
	}
	// as many stages as the one-atom kernels (a stage's weight bytes are
	// theirs: the weight bytes in flight the same)
	for _, bn := range []int{224, 256} {
		if st, sh := wshStages(bn), wshShared(bn); st < wsStages(bn, 1) || st < wsStages(bn, 2) || sh+wshStatic > maxShared || wshStageBytes(bn)-2*wsMaxRows*wsAtom != bn*wsAtom {
			t.Errorf("n%d half-row: %d stages of %d bytes, %d in all (one-atom kernels: %d / %d stages)", bn, st, wshStageBytes(bn), sh, wsStages(bn, 1), wsStages(bn, 2))
		}
	}
	// not without the kernel, the barrier words, or with more blocks than SMs
	g := &wsProduct{esize: 1, sms: 132}
	for i := range g.fn {
		g.fn[i] = &cuda.Function{}
	}
	p := wsPlan{i: 0, split: 1} // n32x1: 128 blocks for N 4096
	if g.normFits(p, 4096) {
		t.Error("normFits without a NORM kernel")
	}
	g.nfn[0] = &cuda.Function{}
	if g.normFits(p, 4096) {
		t.Error("normFits without the barrier words")
	}
	g.nsync = &cuda.DeviceBuffer{}
	if !g.normFits(p, 4096) || g.normFits(wsPlan{i: 0, split: 2}, 4096) || g.normFits(p, 12288) {
		t.Error("normFits: want n32x1 of 4096 only (256 blocks and a 12,288-wide row refused)")
	}
	g.half = true
	if g.halfOn(slices.Index(wsWidths[:], 224)) {
		t.Error("halfOn without the half-row kernel")
	}
}

// TestWsBelowFrom: below wsMinRows fp8_ws takes lone products from
// wsLoneFrom rows and products beside a LoRA update from wsBesideFrom rows
// under wsAuto (the defaults, wsLoneFromDefault and wsBesideFromDefault;
// wsLone keeps it to lone ones), wsFrom where it asks, and nothing with
// wsAuto and wsOn off.
func TestWsBelowFrom(t *testing.T) {
	const L, B = wsLoneFromDefault, wsBesideFromDefault
	for _, c := range []struct {
		name                       string
		auto, on, wsLone           bool
		wsFrom, loneFrom, besideFr int
		lone                       bool
		want                       int
	}{
		{"default, lone", true, false, false, 0, L, B, true, L},
		{"default, beside LoRA", true, false, false, 0, L, B, false, B},
		{"beside rule off, beside LoRA", true, false, false, 0, L, 0, false, 0},
		{"lone rule off", true, false, false, 0, 0, B, true, 0},
		{"wsLone, beside LoRA", true, false, true, 0, L, B, false, 0},
		{"wsAuto off", false, false, false, 0, L, B, true, 0},
		{"wsAuto off, beside LoRA", false, false, false, 0, L, B, false, 0},
		{"+ws12 beside LoRA", true, false, false, 12, L, B, false, 12},
		{"+ws1 lone", true, false, false, 1, L, B, true, 1},
		{"+ws9 with wsLone, beside LoRA", true, false, true, 9, L, B, false, 0},
		{"+ws9 forced on, wsAuto off", false, true, false, 9, 0, 0, false, 9},
	} {
		f := &fp8State{wsAuto: c.auto, wsOn: c.on, wsLone: c.wsLone, wsFrom: c.wsFrom, wsLoneFrom: c.loneFrom, wsBesideFrom: c.besideFr}
		if got := f.wsBelowFrom(c.lone); got != c.want {
			t.Errorf("%s: wsBelowFrom(%v) = %d, want %d", c.name, c.lone, got, c.want)
		}
	}
}

// TestWsBesideHolds: FP8 steps of wsBesideFrom to wsMinRows-1 rows hold
// autoSmallHoldsFP8 SMs from each product for the LoRA stream while their
// products beside an update take fp8_ws (fp8State.wsBeside), and none
// (autoHolds) with the rule off, without the ws kernels, with wsFrom set
// (a benchmark's +wsN names its holds itself), at other rows, or for
// bf16 products.
func TestWsBesideHolds(t *testing.T) {
	cfg := &llama.Config{Hidden: 4096, Intermediate: 14336, Heads: 32, KVHeads: 8, HeadDim: 128}
	mk := func(ws bool, from, wsFrom int) *Backend {
		f := &fp8State{wsAuto: true, wsBesideFrom: from, wsFrom: wsFrom}
		if ws {
			f.ws = &wsProduct{}
		}
		return &Backend{cfg: cfg, f8: f, la: loraAside{sms: -1}}
	}
	qkv := [2]int{6144, 4096}
	for _, c := range []struct {
		name      string
		b         *Backend
		rows      int
		fp8, want bool
	}{
		{"16 rows", mk(true, wsBesideFromDefault, 0), 16, true, true},
		{"9 rows", mk(true, wsBesideFromDefault, 0), 9, true, true},
		{"8 rows", mk(true, wsBesideFromDefault, 0), 8, true, false},
		{"17 rows", mk(true, wsBesideFromDefault, 0), 17, true, false},
		{"rule off", mk(true, 0, 0), 16, true, false},
		{"no ws kernels", mk(false, wsBesideFromDefault, 0), 16, true, false},
		{"+ws9", mk(true, wsBesideFromDefault, 9), 16, true, false},
		{"bf16", mk(true, wsBesideFromDefault, 0), 16, false, false},
	} {
		got := c.b.holdFor(c.rows, qkv[0], qkv[1], c.fp8)
		want := autoHolds(c.rows, c.fp8, true)[0]
		if c.want {
			want = autoSmallHoldsFP8[0]
		}
		if got != want {
			t.Errorf("%s: holdFor = %d, want %d", c.name, got, want)
		}
	}
}

// TestHugeHolds: FP8 steps of more than fp8HugeRows rows hold
// autoHugeHoldsFP8 from each group's product (48 SMs from o and down),
// v0.84's autoBigHoldsFP8 with PEFTD_LORA_FP8_HUGE_HOLDS=off
// (hugeHoldsOff), autoBigHoldsFP8 from fp8MidRows+1 to fp8HugeRows rows,
// and bf16 steps autoWideHolds either way.
func TestHugeHolds(t *testing.T) {
	cfg := &llama.Config{Hidden: 4096, Intermediate: 14336, Heads: 32, KVHeads: 8, HeadDim: 128}
	shapes := [4][2]int{{6144, 4096}, {4096, 4096}, {2 * 14336, 4096}, {4096, 14336}}
	for _, c := range []struct {
		name string
		rows int
		fp8  bool
		off  bool
		want [4]int
	}{
		{"FP8 mixed step", 240, true, false, [4]int{32, 48, 20, 48}},
		{"FP8 256 rows", 256, true, false, [4]int{32, 48, 20, 48}},
		{"FP8 193 rows", 193, true, false, [4]int{32, 48, 20, 48}},
		{"FP8 192 rows", 192, true, false, autoBigHoldsFP8},
		{"FP8 160 rows", 160, true, false, autoBigHoldsFP8},
		{"FP8 mixed step, off", 240, true, true, autoBigHoldsFP8},
		{"bf16 mixed step", 240, false, false, autoWideHolds},
		{"bf16 mixed step, off", 240, false, true, autoWideHolds},
	} {
		b := &Backend{cfg: cfg, f8: &fp8State{}, la: loraAside{sms: -1}, hugeHoldsOff: c.off}
		var got [4]int
		for g, sh := range shapes {
			got[g] = b.holdFor(c.rows, sh[0], sh[1], c.fp8)
		}
		if got != c.want {
			t.Errorf("%s: holds %v, want %v", c.name, got, c.want)
		}
	}
}

// TestSerialGroup: kernelForce.serialLoRA's mask picks the fused groups
// whose update runs after the product (by the weight's shape), only in a
// step with LoRA rows, and none by default or with -1.
func TestSerialGroup(t *testing.T) {
	cfg := &llama.Config{Hidden: 4096, Intermediate: 14336, Heads: 32, KVHeads: 8, HeadDim: 128}
	shapes := [4]*fp8Weight{{rows: 6144, cols: 4096}, {rows: 4096, cols: 4096}, {rows: 2 * 14336, cols: 4096}, {rows: 4096, cols: 14336}}
	for _, c := range []struct {
		name       string
		mask, rows int
		want       [4]bool
	}{
		{"default", 0, 64, [4]bool{}},
		{"none", -1, 64, [4]bool{}},
		{"gate/up", 4, 64, [4]bool{2: true}},
		{"o and down", 10, 64, [4]bool{1: true, 3: true}},
		{"all, no LoRA rows", 15, 0, [4]bool{}},
	} {
		b := &Backend{cfg: cfg, nLora: c.rows, stepRank: 32}
		b.force.serialLoRA = c.mask
		for g, w := range shapes {
			if got := b.serialGroup(w); got != c.want[g] {
				t.Errorf("%s: group %d serial %v, want %v", c.name, g, got, c.want[g])
			}
		}
	}
	if b := (&Backend{cfg: cfg, nLora: 8, stepRank: 32}); b.serialGroup(&weight{rows: 128, cols: 4096}) {
		t.Error("a weight of no fused group: serial")
	}
}

// TestWs16Plan: the 8B down product's one-wave plan at 16 rows is n64x2
// (wsShortRows) unless long16 waives the rule for the 16-row kernels,
// then n32x1; above 16 rows, or with the 16-row kernels off, the rule
// holds whatever long16 says; o keeps n32x1.
func TestWs16Plan(t *testing.T) {
	g := ws16Product()
	for _, c := range []struct {
		T, N, K        int
		rows16, long16 bool
		want           string
	}{
		{16, 4096, 14336, true, false, "n64x2"},
		{16, 4096, 14336, true, true, "n32x1"},
		{17, 4096, 14336, true, true, "n64x2"},
		{16, 4096, 14336, false, true, "n64x2"},
		{16, 4096, 4096, true, true, "n32x1"},
		{16, 4096, 4096, true, false, "n32x1"},
	} {
		g.rows16, g.long16 = c.rows16, c.long16
		p, ok := g.planFrom(c.T, c.N, c.K, 9)
		if !ok || p.String() != c.want {
			t.Errorf("%d x %d x %d, rows16 %v long16 %v: plan %v (ok %v), want %s", c.T, c.N, c.K, c.rows16, c.long16, p, ok, c.want)
		}
	}
}
