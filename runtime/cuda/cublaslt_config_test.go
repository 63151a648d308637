package cuda

import "testing"

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
