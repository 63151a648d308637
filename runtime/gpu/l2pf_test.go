package gpu

import "testing"

func TestL2PrefetchPieces(t *testing.T) {
	for _, c := range []struct {
		name           string
		got            l2Prefetch
		n, len, stride int
		p              uint64
	}{
		// gate_up, bf16: 28,672 rows of 8 KB, 12 MB: 432 bytes of each row
		{"row heads", rowHeads(1<<20, 28672, 8192, 12<<20), 28672, 432, 8192, 1 << 20},
		// a small matrix: whole rows
		{"whole rows", rowHeads(1<<20, 64, 256, 12<<20), 64, 256, 256, 1 << 20},
		// the LM head at 1 MB: 8 bytes a row is less than l2pfMinLen
		{"too thin", rowHeads(1<<20, 128256, 8192, 1<<20), 0, 0, 0, 0},
		{"unaligned", rowHeads(1<<20+8, 64, 256, 1<<20), 0, 0, 0, 0},
		// fp8_gemv's qkv: 6,144 x 4,096 bytes, 12 MB in 64 KB pieces
		{"matrix head", matrixHead(1<<20, 6144*4096, 12<<20), 192, l2pfPiece, l2pfPiece, 1 << 20},
		// a matrix smaller than the budget: all of it
		{"whole matrix", matrixHead(1<<20, 2<<20, 12<<20), 32, l2pfPiece, l2pfPiece, 1 << 20},
		{"under a piece", matrixHead(1<<20, 1<<10, 12<<20), 0, 0, 0, 0},
	} {
		if c.got.n != c.n || c.got.len != c.len || c.got.stride != int64(c.stride) || c.got.p != c.p {
			t.Errorf("%s: %+v, want %d pieces of %d bytes %d apart from %#x", c.name, c.got, c.n, c.len, c.stride, c.p)
		}
		if c.got.len%16 != 0 {
			t.Errorf("%s: %d bytes is not a multiple of 16", c.name, c.got.len)
		}
	}
}
