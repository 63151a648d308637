package gpu

import "testing"

// TestFP8KeyTilingEmulated runs the FP8-key paths' index arithmetic of
// attn_decode8 and attn_prefill8 (kernels/llama.cu) on the CPU, lane by
// lane: each tile's e4m3 bytes are copied exactly once, every bf16 chunk
// of the K tile is widened exactly once from the raw chunk of the same row
// and columns, and every row's scale is copied once, for each head_dim
// the kernels take.
func TestFP8KeyTilingEmulated(t *testing.T) {
	const decTile, preKT, preThreads = 16, 64, 128
	for _, hd := range []int{32, 64, 128, 256} {
		C := hd / 8 // 16-byte bf16 chunks (8 values) per row
		// attn_decode8: one warp per tile
		raw := make([]int, decTile*hd) // bytes copied into the raw tile
		wide := make([]int, decTile*C) // bf16 chunks written
		scale := make([]int, decTile)  // scales copied
		for lane := range 32 {
			for i := range hd / 32 { // issue: the raw rows, 16-byte chunks
				idx := lane + 32*i
				r, c := idx/(hd/16), idx%(hd/16)
				for b := range 16 {
					raw[r*hd+c*16+b]++
				}
			}
			if lane < decTile {
				scale[lane]++
			}
			for i := range C / 2 { // widen: 8 raw bytes -> one bf16 chunk
				idx := lane + 32*i
				r, c := idx/C, idx%C
				wide[r*C+c]++
				if src := r*hd + c*8; src+8 > (r+1)*hd || src < r*hd {
					t.Fatalf("hd %d: lane %d widens row %d chunk %d from bytes %d.. outside its row", hd, lane, r, c, src)
				}
			}
		}
		once := func(what string, v []int) {
			for i, n := range v {
				if n != 1 {
					t.Fatalf("hd %d: %s %d written %d times", hd, what, i, n)
				}
			}
		}
		once("decode raw byte", raw)
		once("decode bf16 chunk", wide)
		once("decode scale", scale)
		if hd > 128 {
			continue // attn_prefill takes head_dim <= 128
		}
		// attn_prefill8: the block's threads, each its chunks (r, c) of the stage
		NR, RSTEP := preKT*C/preThreads, preThreads/C
		raw = make([]int, preKT*hd)
		wide = make([]int, preKT*C)
		scale = make([]int, preKT)
		for tid := range preThreads {
			for i := range NR {
				r, c := tid/C+i*RSTEP, tid%C
				for b := range 8 { // the chunk's 8 e4m3 bytes (cp_async8)
					raw[r*hd+c*8+b]++
				}
				if c == 0 {
					scale[r]++
				}
				wide[r*C+c]++ // widened by the thread that copied it
			}
		}
		once("prefill raw byte", raw)
		once("prefill bf16 chunk", wide)
		once("prefill scale", scale)
	}
}

// TestAttentionSharedMemory: every attention kernel variant's dynamic
// shared memory fits a Hopper block (227 KB), and FP8 keys cost no blocks
// per SM (one widened K tile per warp or block, not one per stage).
func TestAttentionSharedMemory(t *testing.T) {
	for _, hd := range []int{32, 64, 128, 256} {
		for _, k8 := range []bool{false, true} {
			if d := decShared(hd, k8, decV4); d > 227<<10 {
				t.Errorf("attn_decode hd %d k8 %v: %d bytes", hd, k8, d)
			}
			// the merge area reuses the stage buffers: it must fit them
			// with up to 8 query heads a KV head (G <= 8)
			for _, v := range []decVariant{decV4, decV2, decV8} {
				if v == decV8 && hd > 128 {
					continue
				}
				if m, d := 4*decMergeFloats(hd, v.warps(), 8), decShared(hd, k8, v); m > d {
					t.Errorf("attn_decode hd %d k8 %v %s: the merge area takes %d bytes of %d", hd, k8, v, m, d)
				}
			}
			if hd <= 128 {
				if p := preShared(hd, k8); p > 227<<10 {
					t.Errorf("attn_prefill hd %d k8 %v: %d bytes", hd, k8, p)
				}
			}
		}
		// FP8 keys must not cost occupancy: as many blocks per SM as bf16
		// (H200: 228 KB of shared memory an SM, 1 KB of it reserved per block)
		perSM := func(shared int) int { return 233472 / (shared + 1024) }
		// nor gain any at head_dim 128: three blocks of e4m3 Q K^T (73 KB)
		// ran slower than two (v0.25)
		if a, b := perSM(decShared(hd, true, decV4)), perSM(decShared(hd, false, decV4)); a < b || hd == 128 && a != b {
			t.Errorf("hd %d: attn_decode8 fits %d blocks an SM, attn_decode %d", hd, a, b)
		}
		if hd <= 128 {
			if a, b := perSM(preShared(hd, true)), perSM(preShared(hd, false)); a < b {
				t.Errorf("hd %d: attn_prefill8 fits %d blocks an SM, attn_prefill %d", hd, a, b)
			}
		}
	}
}
