package cuda

import (
	"errors"
	"slices"
	"testing"
)

func TestAlgoConfigString(t *testing.T) {
	for _, c := range []struct {
		cfg  AlgoConfig
		want string
	}{
		{AlgoConfig{Tile: 20, Stages: 35, Cluster: 2}, "128x128/st35/cl2"},
		{AlgoConfig{Tile: 18, Stages: 0, Cluster: 0}, "128x64/st0/cl0"},
		{AlgoConfig{Tile: 35, Stages: 1, Cluster: 3}, "256x32/st1/cl3"},
		{AlgoConfig{Tile: 99, Stages: 1, Cluster: 3}, "tile99/st1/cl3"},
	} {
		if got := c.cfg.String(); got != c.want {
			t.Errorf("%+v: %q, want %q", c.cfg, got, c.want)
		}
	}
}

// TestSetTuneSplits: the K splits TuneGemmTN adds are 2 to most ways; fewer
// than 2 none; more than 64 an error that leaves them as they were.
func TestSetTuneSplits(t *testing.T) {
	m := &Matmul{}
	for _, c := range []struct {
		most int
		want []uint32
	}{{4, []uint32{2, 3, 4}}, {2, []uint32{2}}, {1, nil}, {0, nil}, {-3, nil}} {
		if err := m.SetTuneSplits(c.most); err != nil {
			t.Fatalf("SetTuneSplits(%d): %v", c.most, err)
		}
		if !slices.Equal(m.tuneSplits, c.want) {
			t.Errorf("SetTuneSplits(%d): %v, want %v", c.most, m.tuneSplits, c.want)
		}
	}
	if err := m.SetTuneSplits(3); err != nil {
		t.Fatal(err)
	}
	if err := m.SetTuneSplits(65); !errors.Is(err, ErrInvalidValue) {
		t.Errorf("SetTuneSplits(65): %v, want ErrInvalidValue", err)
	}
	if !slices.Equal(m.tuneSplits, []uint32{2, 3}) {
		t.Errorf("a refused SetTuneSplits changed the splits to %v", m.tuneSplits)
	}
	if got := (splitVariant{base: 1, splits: 4, scheme: 2}).String(); got != "sk4/rs2" {
		t.Errorf("splitVariant name %q, want sk4/rs2", got)
	}
}
