package api

import (
	"bufio"
	"encoding/json"
	"fmt"

	"github.com/gofiber/fiber/v2"
)

// startSSE marks the response as a Server-Sent Events stream that proxies
// must not buffer.
func startSSE(c *fiber.Ctx) {
	c.Set(fiber.HeaderContentType, "text/event-stream")
	c.Set(fiber.HeaderCacheControl, "no-cache")
	c.Set(fiber.HeaderConnection, "keep-alive")
	c.Set("X-Accel-Buffering", "no")
}

// sseEvent writes v as one "data:" event and flushes it to the client.
func sseEvent(w *bufio.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if _, err := fmt.Fprintf(w, "data: %s\n\n", b); err != nil {
		return err
	}
	return w.Flush()
}

// sseDone ends a stream the client is still reading.
func sseDone(w *bufio.Writer) {
	w.WriteString("data: [DONE]\n\n")
	w.Flush()
}

// streamErr maps an error ending a streamed request to the status to record
// and the error event to send.
func streamErr(err error) (int, fiber.Map) {
	e := runErr(err)
	return e.Status, e.body()
}
