package engine

import (
	"bytes"
	"testing"
)

func TestConcat(t *testing.T) {
	mk := func(n int, seed byte) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = seed + byte(i*7)
		}
		return b
	}
	for _, sizes := range [][]int{{}, {0}, {5}, {3, 0, 9}, {16<<20 + 3, 1, 40 << 20}} {
		var parts [][]byte
		var want []byte
		for i, n := range sizes {
			p := mk(n, byte(i))
			parts = append(parts, p)
			want = append(want, p...)
		}
		if got := concat(parts); !bytes.Equal(got, want) {
			t.Errorf("sizes %v: concat differs from append", sizes)
		}
	}
}
