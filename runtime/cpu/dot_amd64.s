#include "textflag.h"

// Horizontal sum of the eight lanes of Y into the low lane of X (fixed order).
#define HSUM(Y, X, T) \
	VEXTRACTF128 $1, Y, T; \
	VADDPS T, X, X; \
	VHADDPS X, X, X; \
	VHADDPS X, X, X

// func dotAVX(a, w *float32, n int) float32
// n is a multiple of 8.
TEXT ·dotAVX(SB), NOSPLIT, $0-28
	MOVQ a+0(FP), SI
	MOVQ w+8(FP), DX
	MOVQ n+16(FP), CX
	VXORPS Y0, Y0, Y0
	XORQ AX, AX
loop1:
	CMPQ AX, CX
	JGE done1
	VMOVUPS (DX)(AX*4), Y4
	VFMADD231PS (SI)(AX*4), Y4, Y0
	ADDQ $8, AX
	JMP loop1
done1:
	HSUM(Y0, X0, X5)
	MOVSS X0, ret+24(FP)
	VZEROUPPER
	RET

// func dot4AVX(a0, a1, a2, a3, w *float32, n int) (r0, r1, r2, r3 float32)
// n is a multiple of 8. Each row accumulates exactly as dotAVX does.
TEXT ·dot4AVX(SB), NOSPLIT, $0-64
	MOVQ a0+0(FP), SI
	MOVQ a1+8(FP), DI
	MOVQ a2+16(FP), R8
	MOVQ a3+24(FP), R9
	MOVQ w+32(FP), DX
	MOVQ n+40(FP), CX
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	XORQ AX, AX
loop4:
	CMPQ AX, CX
	JGE done4
	VMOVUPS (DX)(AX*4), Y4
	VFMADD231PS (SI)(AX*4), Y4, Y0
	VFMADD231PS (DI)(AX*4), Y4, Y1
	VFMADD231PS (R8)(AX*4), Y4, Y2
	VFMADD231PS (R9)(AX*4), Y4, Y3
	ADDQ $8, AX
	JMP loop4
done4:
	HSUM(Y0, X0, X5)
	MOVSS X0, r0+48(FP)
	HSUM(Y1, X1, X5)
	MOVSS X1, r1+52(FP)
	HSUM(Y2, X2, X5)
	MOVSS X2, r2+56(FP)
	HSUM(Y3, X3, X5)
	MOVSS X3, r3+60(FP)
	VZEROUPPER
	RET
