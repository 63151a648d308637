package safetensors

import "math"

// Element codecs for the dtypes this package reads and writes: float32 to
// bf16, and FP8 e4m3 (F8_E4M3) both ways.

// Float32ToBF16 rounds to the nearest bf16 (ties to even); NaN stays NaN.
func Float32ToBF16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 {
		return uint16(b>>16) | 0x40
	}
	b += 0x7fff + (b>>16)&1
	return uint16(b >> 16)
}

// E4M3ToFloat32 decodes an FP8 e4m3 (fn) byte: bias 7, no infinities,
// 0x7f/0xff are NaN, subnormals 2^-6 * m/8.
func E4M3ToFloat32(b byte) float32 {
	s := float32(1)
	if b&0x80 != 0 {
		s = -1
	}
	e, m := int(b>>3&0xf), int(b&7)
	if e == 15 && m == 7 {
		return float32(math.NaN())
	}
	if e == 0 {
		return s * float32(m) / 8 * float32(math.Ldexp(1, -6))
	}
	return s * (1 + float32(m)/8) * float32(math.Ldexp(1, e-7))
}

// RoundE4M3 is E4M3ToFloat32(Float32ToE4M3(v)) without the search: v
// rounded to the nearest e4m3 value (ties to even), saturating to ±448;
// NaN stays NaN.
func RoundE4M3(v float32) float32 {
	if v != v {
		return v
	}
	a := float32(math.Abs(float64(v)))
	var r float32
	switch {
	case a >= 464: // the midpoint of 448 and 480 rounds to even: 448
		r = 448
	case a < 1.0/64: // subnormals: multiples of 2^-9 (the scaling is exact)
		r = float32(math.RoundToEven(float64(a)*512)) / 512
	default: // keep 3 of float32's 23 mantissa bits, ties to even
		b := math.Float32bits(a)
		b += 0x7ffff + (b>>20)&1
		r = min(math.Float32frombits(b&^0xfffff), 448)
	}
	if v < 0 {
		return -r
	}
	return r
}

// Float32ToE4M3 rounds to the nearest e4m3 value (ties to even), saturating
// to ±448 (the __NV_SATFINITE conversion); NaN gives 0x7f.
func Float32ToE4M3(v float32) byte {
	if v != v {
		return 0x7f
	}
	var sign byte
	if math.Signbit(float64(v)) {
		sign = 0x80
		v = -v
	}
	if v >= 464 { // halfway between 448 and the next step (480) rounds to even 448... and beyond saturates
		return sign | 0x7e
	}
	// search the 127 non-negative finite codes: exact rounding by comparison
	lo, hi := 0, 126
	for lo < hi { // largest code with value <= v
		mid := (lo + hi + 1) / 2
		if E4M3ToFloat32(byte(mid)) <= v {
			lo = mid
		} else {
			hi = mid - 1
		}
	}
	c := lo
	if c < 126 {
		a, b := float64(E4M3ToFloat32(byte(c))), float64(E4M3ToFloat32(byte(c+1)))
		d0, d1 := float64(v)-a, b-float64(v)
		if d1 < d0 || (d1 == d0 && (c+1)%2 == 0) {
			c++
		}
	}
	return sign | byte(c)
}
