package cuda

import (
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"unsafe"
)

// TestDevResourceLayout reads a CUdevResource's type and SM count where
// cuda.h puts them, and holds at least the header's struct.
func TestDevResourceLayout(t *testing.T) {
	var r devResource
	b := r.bytes()
	binary.LittleEndian.PutUint32(b[0:], devResourceTypeSM)
	binary.LittleEndian.PutUint32(b[devResourceSMCount:], 116)
	if r.kind() != devResourceTypeSM || r.smCount() != 116 {
		t.Errorf("kind %d, SMs %d; want %d, 116", r.kind(), r.smCount(), devResourceTypeSM)
	}
	if unsafe.Sizeof(r) < 144 || unsafe.Alignof(r) < 8 {
		t.Errorf("devResource is %d bytes, %d-aligned: smaller than CUDA 12.4-13's 144, 8", unsafe.Sizeof(r), unsafe.Alignof(r))
	}
}

// TestDevResourceLayoutHeader checks the offsets against a cuda.h where
// one is on this machine (scripts/cuda-local.sh's, or $CUDA_HOME's) and a C
// compiler is; otherwise it skips.
func TestDevResourceLayoutHeader(t *testing.T) {
	var inc string
	for _, d := range []string{filepath.Join("..", "..", ".cache", "cuda-local", "include"), filepath.Join(CUDAHome(), "include")} {
		if _, err := os.Stat(filepath.Join(d, "cuda.h")); err == nil {
			inc = d
			break
		}
	}
	cc, err := exec.LookPath("cc")
	if inc == "" || err != nil {
		t.Skip("no cuda.h or no C compiler here")
	}
	if out, err := exec.Command("grep", "-q", "CUdevResource_st", filepath.Join(inc, "cuda.h")).CombinedOutput(); err != nil {
		t.Skipf("%s/cuda.h predates green contexts (%s)", inc, out)
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "off.c")
	prog := "#include <stddef.h>\n#include <stdio.h>\n#include <cuda.h>\n" +
		"int main(void) { printf(\"%zu %zu %zu\", offsetof(CUdevResource, type), offsetof(CUdevResource, sm.smCount), sizeof(CUdevResource)); return 0; }\n"
	if err := os.WriteFile(src, []byte(prog), 0o644); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "off")
	if out, err := exec.Command(cc, "-I", inc, src, "-o", bin).CombinedOutput(); err != nil {
		t.Fatalf("cc: %v\n%s", err, out)
	}
	out, err := exec.Command(bin).Output()
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(out))
	want := []int{0, devResourceSMCount, -1}
	for i, s := range f {
		n, _ := strconv.Atoi(s)
		if i < 2 && n != want[i] {
			t.Errorf("%s: field %d at byte %d, green.go reads it at %d", inc, i, n, want[i])
		}
		if i == 2 && uintptr(n) > unsafe.Sizeof(devResource{}) {
			t.Errorf("%s: CUdevResource is %d bytes, devResource %d", inc, n, unsafe.Sizeof(devResource{}))
		}
	}
	t.Logf("%s: type at %s, sm.smCount at %s, %s bytes", inc, f[0], f[1], f[2])
}
