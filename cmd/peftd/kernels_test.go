package main

import (
	"context"
	"io"
	"strings"
	"testing"
)

func TestParseArch(t *testing.T) {
	for _, c := range []struct {
		in           string
		major, minor int
		ok           bool
	}{
		{"9.0", 9, 0, true}, {"8.9", 8, 9, true}, {"sm_90a", 9, 0, true}, {"sm_90", 9, 0, true}, {"sm_86", 8, 6, true},
		{"sm_100f", 10, 0, true}, {"12.0", 12, 0, true},
		{"7.5", 0, 0, false}, {"sm_75", 0, 0, false}, {"90", 0, 0, false}, {"sm_", 0, 0, false}, {"9.x", 0, 0, false}, {"", 0, 0, false},
	} {
		ma, mi, err := parseArch(c.in)
		if (err == nil) != c.ok || (c.ok && (ma != c.major || mi != c.minor)) {
			t.Errorf("parseArch(%q) = %d, %d, %v; want %d, %d, ok %v", c.in, ma, mi, err, c.major, c.minor, c.ok)
		}
		if err != nil && !strings.Contains(err.Error(), "--arch") {
			t.Errorf("parseArch(%q): the error %q does not name the flag", c.in, err)
		}
	}
}

func TestKernelTargets(t *testing.T) {
	got, err := kernelTargets("8.0, sm_90a,9.0,8.9")
	if err != nil {
		t.Fatal(err)
	}
	var archs []string
	for _, g := range got {
		archs = append(archs, g.arch)
	}
	// runtime/gpu asks NVRTC for sm_90a on Hopper; duplicates go
	if strings.Join(archs, " ") != "sm_80 sm_90a sm_89" {
		t.Errorf("targets %v, want sm_80 sm_90a sm_89", archs)
	}
	if got[1].cc != 90 || got[2].cc != 89 {
		t.Errorf("compute capabilities %+v", got)
	}
}

func TestKernelsCommandErrors(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--arch", "7.0"}, "8.0 or later"},
		{[]string{"--arch", "9.0", "extra"}, `unexpected argument "extra"`},
	} {
		err := run(context.Background(), append([]string{"kernels"}, c.args...), io.Discard, io.Discard)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("peftd kernels %v: %v, want an error saying %q", c.args, err, c.want)
		}
	}
}
