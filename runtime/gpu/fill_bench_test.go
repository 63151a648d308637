package gpu

import (
	"testing"

	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/runtime/lora"
)

func BenchmarkFillImage8B(b *testing.B) {
	cfg := adaptertest.Llama8B(b)
	c, w := adaptertest.Random(b, cfg, 32, 1)
	a, err := lora.ParseOwned("x", c, w, cfg)
	if err != nil {
		b.Fatal(err)
	}
	bk := &Backend{cfg: cfg}
	img, err := bk.slotLayout(a)
	if err != nil {
		b.Fatal(err)
	}
	chunk := make([]uint16, 8<<20)
	b.SetBytes(int64(2 * img.total))
	b.Run("fill", func(b *testing.B) {
		b.SetBytes(int64(2 * img.total))
		for range b.N {
			for off := 0; off < img.total; off += len(chunk) {
				n := min(len(chunk), img.total-off)
				img.fill(chunk[:n], off, a)
			}
		}
	})
	src := make([]uint16, img.total)
	b.Run("copy", func(b *testing.B) {
		b.SetBytes(int64(2 * img.total))
		for range b.N {
			for off := 0; off < img.total; off += len(chunk) {
				n := min(len(chunk), img.total-off)
				copy(chunk[:n], src[off:off+n])
			}
		}
	})
}
