package cpu

import "golang.org/x/sys/cpu"

// useAVX selects the AVX2+FMA dot products; every row on a machine takes the
// same path, so a row's result never depends on its batch.
var useAVX = cpu.X86.HasAVX2 && cpu.X86.HasFMA

//go:noescape
func dotAVX(a, w *float32, n int) float32

//go:noescape
func dot4AVX(a0, a1, a2, a3, w *float32, n int) (r0, r1, r2, r3 float32)
