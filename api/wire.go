package api

// OpenAI's and peftd's response bodies as typed structs. `omitzero` fields
// appear only when set (a nil slice is absent, an empty one is []); `any`
// fields set to nil are written as null, as OpenAI writes them.

type invokeResponse struct {
	ID             string     `json:"id"`
	Object         string     `json:"object"` // invocation
	Created        int64      `json:"created"`
	Adapter        string     `json:"adapter"`
	Text           string     `json:"text"`
	TokenIDs       []int32    `json:"token_ids"`
	PromptTokenIDs []int32    `json:"prompt_token_ids"`
	FinishReason   string     `json:"finish_reason"`
	Usage          usage      `json:"usage"`
	Logprobs       []invokeLP `json:"logprobs,omitzero"`
}

type invokeChunk struct {
	ID             string     `json:"id"`
	Object         string     `json:"object"` // invocation.chunk
	Created        int64      `json:"created"`
	Adapter        string     `json:"adapter"`
	Text           string     `json:"text"`
	TokenIDs       []int32    `json:"token_ids"`
	PromptTokenIDs []int32    `json:"prompt_token_ids,omitzero"` // first chunk
	Logprobs       []invokeLP `json:"logprobs,omitzero"`
	FinishReason   string     `json:"finish_reason,omitzero"` // last chunk
	Usage          *usage     `json:"usage,omitzero"`         // last chunk
}

// completionChoiceJSON is one choice of a completions answer or chunk.
type completionChoiceJSON struct {
	Index          int     `json:"index"`
	Text           string  `json:"text"`
	Logprobs       any     `json:"logprobs"`      // *completionLogprobs or null
	FinishReason   any     `json:"finish_reason"` // string, or null in a chunk
	TokenIDs       []int32 `json:"token_ids,omitzero"`
	PromptTokenIDs []int32 `json:"prompt_token_ids,omitzero"`
}

type completionResponse struct {
	ID                string                 `json:"id"`
	Object            string                 `json:"object"` // text_completion
	Created           int64                  `json:"created"`
	Model             string                 `json:"model"`
	Choices           []completionChoiceJSON `json:"choices"`
	Usage             *usage                 `json:"usage,omitzero"`
	SystemFingerprint nullField              `json:"system_fingerprint,omitzero"`
	PromptTokenIDs    []int32                `json:"prompt_token_ids,omitzero"`
}

type chatMessage struct {
	Role      string `json:"role"`
	Content   string `json:"content"`
	Refusal   any    `json:"refusal"`
	ToolCalls []any  `json:"tool_calls"`
}

type chatChoice struct {
	Index        int          `json:"index"`
	Message      *chatMessage `json:"message,omitzero"`
	Delta        *chatDelta   `json:"delta,omitzero"`
	Logprobs     any          `json:"logprobs"`      // chat logprobs or null
	FinishReason any          `json:"finish_reason"` // string, or null in a chunk
	TokenIDs     []int32      `json:"token_ids,omitzero"`
}

// chatDelta is a streamed piece of the assistant's message: the role in the
// first chunk only, the content in every chunk but a last one that follows
// others.
type chatDelta struct {
	Role    string  `json:"role,omitzero"`
	Content *string `json:"content,omitzero"`
}

type chatResponse struct {
	ID                string       `json:"id"`
	Object            string       `json:"object"` // chat.completion or chat.completion.chunk
	Created           int64        `json:"created"`
	Model             string       `json:"model"`
	Choices           []chatChoice `json:"choices"`
	Usage             *usage       `json:"usage,omitzero"`
	SystemFingerprint nullField    `json:"system_fingerprint,omitzero"`
	PromptTokenIDs    []int32      `json:"prompt_token_ids,omitzero"`
}

// nullField is a field OpenAI sends as null in some bodies and leaves out
// of others: true writes null, false (omitzero) leaves it out.
type nullField bool

func (nullField) MarshalJSON() ([]byte, error) { return []byte("null"), nil }
