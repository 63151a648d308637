//go:build !amd64

package cpu

const useAVX = false

func dotAVX(a, w *float32, n int) float32 { panic("cpu: no AVX") }

func dot4AVX(a0, a1, a2, a3, w *float32, n int) (r0, r1, r2, r3 float32) { panic("cpu: no AVX") }
