package cuda

import (
	"reflect"
	"testing"
	"unsafe"

	"github.com/ebitengine/purego"
)

// TestDriverSignatures registers every binding's Go function type (the
// driver's, NVRTC's, cuBLASLt's) with purego against a libc symbol,
// calling nothing, as the loaders do against the CUDA libraries: a type
// purego cannot marshal panics there, on every machine with a GPU, so it
// fails here first.
func TestDriverSignatures(t *testing.T) {
	h, err := purego.Dlopen("libc.so.6", purego.RTLD_NOW)
	if err != nil {
		t.Skipf("no libc.so.6 to register against: %v", err)
	}
	addr, err := purego.Dlsym(h, "abs")
	if err != nil {
		t.Skip(err)
	}
	var (
		d driver
		r nvrtcLib
		l cublasLtLib
	)
	n := 0
	var walk func(v reflect.Value, path string)
	walk = func(v reflect.Value, path string) {
		for i := range v.NumField() {
			f, name := v.Field(i), path+v.Type().Field(i).Name
			switch f.Kind() {
			case reflect.Func:
				n++
				func() {
					defer func() {
						if r := recover(); r != nil {
							t.Errorf("%s: purego cannot bind %v: %v", name, f.Type(), r)
						}
					}()
					purego.RegisterFunc(reflect.NewAt(f.Type(), unsafe.Pointer(f.UnsafeAddr())).Interface(), addr)
				}()
			case reflect.Struct:
				walk(f, name+".")
			}
		}
	}
	walk(reflect.ValueOf(&d).Elem(), "driver.")
	walk(reflect.ValueOf(&r).Elem(), "nvrtc.")
	walk(reflect.ValueOf(&l).Elem(), "cublasLt.")
	if n < 80 {
		t.Errorf("only %d bindings found", n)
	}
	t.Logf("%d bindings registered", n)
}
