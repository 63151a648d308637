package engine

// Finish reasons: why a generation ended (the scheduler's Done events).
const (
	FinishStop   = "stop"   // a stop token (the model's EOS or another) was generated
	FinishLength = "length" // the max tokens or the context ran out
)
