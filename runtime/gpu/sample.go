package gpu

import (
	"fmt"
	"math"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/sample"
)

// Words per row of the sample_rows kernel's parameters and results (SP_WORDS,
// SO_WORDS, SO_MAXTOP in llama.cu).
const (
	spWords  = 12
	soMaxTop = 20
	soWords  = 2 + 2*soMaxTop
)

// SampleRows draws one token per requested logits row on the device
// (kernel sample_rows) and copies back only the tokens and log-probabilities.
// It waits for the step.
func (b *Backend) SampleRows(logits engine.Buffer, rows []engine.RowSample, out []sample.Choice) error {
	if len(out) < len(rows) {
		return fmt.Errorf("gpu: sample: %d rows, %d results", len(rows), len(out))
	}
	d, err := b.issueDraw(logits, rows)
	if err != nil || d == nil {
		return err
	}
	if err := b.waitStep(); err != nil {
		return err
	}
	return d.parse(out)
}

// draw is a draw issued on the device: where its results land (pinned) and
// what reading them needs.
type draw struct {
	res  []int32
	tops []int // logprob alternatives per row
	cols int
	set  int        // the staging set (Backend.smp) it uses
	tm   *stepTimer // the step's timer (IssueSample)
}

// takeSet is the staging set for the next draw: with chained steps the
// sets take turns (the other may feed a draw still in flight).
func (b *Backend) takeSet() int {
	set := b.smpi
	if b.chain.on {
		b.smpi ^= 1
	}
	return set
}

// smpBuf is one staging set of the draws: pinned parameters and results,
// and their device copy.
type smpBuf struct {
	host *cuda.HostBuffer
	dev  *cuda.DeviceBuffer
}

// parse fills out from the draw's results, once they are in.
func (d *draw) parse(out []sample.Choice) error {
	if len(out) < len(d.tops) {
		return fmt.Errorf("gpu: sample: %d rows, %d results", len(d.tops), len(out))
	}
	for i, top := range d.tops {
		o := d.res[i*soWords : (i+1)*soWords]
		id := o[0]
		if id < 0 || int(id) >= d.cols {
			return fmt.Errorf("gpu: sample: kernel returned token %d", id)
		}
		c := sample.Choice{ID: id, Logprob: float64(math.Float32frombits(uint32(o[1])))}
		for j := 0; j < top && j < d.cols; j++ {
			c.Top = append(c.Top, sample.TokenLogprob{ID: o[2+j], Logprob: float64(math.Float32frombits(uint32(o[2+soMaxTop+j])))})
		}
		out[i] = c
	}
	return nil
}

// issueDraw enqueues the draw of rows (nil for none): the parameters' copy,
// the logit adjustments, sample_rows (which also fills the ring of chained
// steps) and the results' copy into pinned memory, without waiting.
func (b *Backend) issueDraw(logits engine.Buffer, rows []engine.RowSample) (*draw, error) {
	b.join()
	if b.err != nil {
		return nil, b.err
	}
	if b.meta == nil {
		return nil, fmt.Errorf("%w: SampleRows outside a step", ErrBadStep)
	}
	lb := buf(logits)
	n := len(rows)
	b.chain.drawn = 0 // until this draw is enqueued: the draws a step chained behind it may read
	if n == 0 {
		return nil, nil
	}
	if !lb.isF32 || lb.f32 == nil {
		return nil, fmt.Errorf("gpu: sample: the buffer holds no float32 logits")
	}
	if err := b.markTail(); err != nil {
		return nil, err
	}
	if soMaxTop < sample.MaxLogprobs {
		return nil, fmt.Errorf("gpu: sample: %d alternatives, the kernel returns %d", sample.MaxLogprobs, soMaxTop)
	}
	adj := 0 // logit_adjust entries, four words each, after the results
	for _, r := range rows {
		adj += len(r.Adjust)
	}
	words := n*(spWords+soWords) + 4*adj
	// 1 MB at first (256 rows and 60,000 adjustments), then twice what
	// is needed: pinning memory stalls the device, so it happens rarely
	set := b.takeSet()
	sb := &b.smp[set]
	if sb.host == nil || sb.dev == nil || sb.host.Size() < 4*words {
		sb.host.Free()
		sb.dev.Free()
		sb.host, sb.dev = nil, nil
		h, err := b.ctx.AllocHost(4 * max(2*words, 1<<18))
		if err != nil {
			return nil, err
		}
		d, err := b.ctx.Alloc(4 * max(2*words, 1<<18))
		if err != nil {
			h.Free() // both or neither: the next step tries again
			return nil, err
		}
		sb.host, sb.dev = h, d
	}
	h := sb.host.Int32s()
	nLogit := len(b.meta.LogitRows)
	for i, r := range rows {
		if r.Row < 0 || r.Row >= nLogit {
			return nil, fmt.Errorf("%w: sample row %d outside %d logits rows", ErrBadStep, r.Row, nLogit)
		}
		if err := r.Params.Validate(); err != nil {
			return nil, err
		}
		p := h[i*spWords : (i+1)*spWords]
		p[0] = int32(math.Float32bits(float32(r.Params.Temperature)))
		p[1] = int32(math.Float32bits(float32(r.Params.TopP)))
		p[2] = int32(r.Params.TopK)
		p[3] = int32(r.Params.Logprobs)
		p[4], p[5] = int32(uint32(r.Seed)), int32(uint32(r.Seed>>32))
		p[6], p[7] = int32(uint32(r.Counter)), int32(uint32(r.Counter>>32))
		p[8] = int32(r.Row)
		p[9], p[10], p[11] = 0, 0, 0
	}
	ent := h[n*(spWords+soWords) : n*(spWords+soWords)+4*adj]
	k := 0
	for _, r := range rows {
		for _, a := range r.Adjust {
			if a.Token < 0 || int(a.Token) >= lb.cols {
				return nil, fmt.Errorf("%w: sample row %d adjusts token %d of %d", ErrBadStep, r.Row, a.Token, lb.cols)
			}
			ent[4*k], ent[4*k+1] = int32(r.Row), a.Token
			ent[4*k+2], ent[4*k+3] = int32(math.Float32bits(a.Rep)), int32(math.Float32bits(a.Add))
			k++
		}
	}
	pDev := sb.dev.Ptr()
	oDev := pDev + uint64(4*n*spWords)
	eDev := oDev + uint64(4*n*soWords)
	if err := cuda.CopyHtoD(b.s, pDev, h[:n*spWords]); err != nil {
		return nil, err
	}
	if adj > 0 {
		if err := cuda.CopyHtoD(b.s, eDev, ent); err != nil {
			return nil, err
		}
		b.launch(b.fn.logitAdjust, cuda.Dim3{X: (adj + 255) / 256}, cuda.Dim3{X: 256}, lb.f32, eDev, adj, lb.cols)
	}
	ring := b.chain.ringPtr(n)
	b.launch(b.fn.sample, cuda.Dim3{X: n}, cuda.Dim3{X: 1024}, oDev, lb.f32, pDev, lb.cols, ring)
	if b.err != nil {
		return nil, b.err
	}
	if err := b.markEnd(); err != nil {
		return nil, err
	}
	res := h[n*spWords : n*spWords+n*soWords]
	if err := cuda.CopyDtoH(b.s, res, oDev); err != nil {
		return nil, err
	}
	if ring != 0 {
		b.chain.drawn = n
	}
	d := &draw{res: res, tops: make([]int, n), cols: lb.cols, set: set}
	for i, r := range rows {
		d.tops[i] = r.Params.Logprobs
	}
	return d, nil
}
