package probe

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

func start(t *testing.T, h Handlers, timeout time.Duration) *Server {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := serve(lis, h, timeout)
	t.Cleanup(s.Close)
	return s
}

// do sends a request with Go's HTTP client, which the kubelet's prober
// and Prometheus use.
func do(t *testing.T, s *Server, method, path string, body io.Reader) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+s.Addr().String()+path, body)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: body: %v", method, path, err)
	}
	return resp, string(b)
}

func TestEndpoints(t *testing.T) {
	var reason atomic.Value
	reason.Store("first scan not done")
	var scrapes atomic.Int32
	s := start(t, Handlers{
		Ready: func() string { return reason.Load().(string) },
		Metrics: func(w io.Writer) {
			fmt.Fprintf(w, "# HELP things_total Things.\n# TYPE things_total counter\nthings_total{kind=\"a\"} %d\n", scrapes.Add(1))
		},
	}, timeout)

	for _, c := range []struct {
		method, path string
		code         int
		body         string
	}{
		{"GET", "/healthz", 200, "ok\n"},
		{"GET", "/readyz", 503, "not ready: first scan not done\n"},
		{"GET", "/readyz?verbose=1", 503, "not ready: first scan not done\n"},
		{"GET", "/nothing", 404, "not found: /nothing\n"},
		{"HEAD", "/healthz", 200, ""},
		{"DELETE", "/healthz", 405, "GET or HEAD only\n"},
	} {
		resp, body := do(t, s, c.method, c.path, nil)
		if resp.StatusCode != c.code || body != c.body {
			t.Errorf("%s %s: %d %q; want %d %q", c.method, c.path, resp.StatusCode, body, c.code, c.body)
		}
		if got := resp.Header.Get("Content-Type"); got != "text/plain; charset=utf-8" {
			t.Errorf("%s %s: Content-Type %q", c.method, c.path, got)
		}
		if c.method == "HEAD" && resp.ContentLength != int64(len("ok\n")) {
			t.Errorf("HEAD %s: Content-Length %d; want the GET body's", c.path, resp.ContentLength)
		}
		if c.code == 405 && resp.Header.Get("Allow") != "GET, HEAD" {
			t.Errorf("405 without Allow: %v", resp.Header)
		}
		if _, err := time.Parse(http.TimeFormat, resp.Header.Get("Date")); err != nil {
			t.Errorf("%s %s: Date %q: %v", c.method, c.path, resp.Header.Get("Date"), err)
		}
	}

	reason.Store("")
	if resp, body := do(t, s, "GET", "/readyz", nil); resp.StatusCode != 200 || body != "ok\n" {
		t.Errorf("ready: GET /readyz: %d %q", resp.StatusCode, body)
	}

	for want := 1; want <= 2; want++ {
		resp, body := do(t, s, "GET", "/metrics", nil)
		if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != metricsType {
			t.Fatalf("GET /metrics: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
		}
		parser := expfmt.NewTextParser(model.UTF8Validation)
		families, err := parser.TextToMetricFamilies(strings.NewReader(body))
		if err != nil {
			t.Fatalf("/metrics does not parse: %v\n%s", err, body)
		}
		if got := families["things_total"].GetMetric()[0].GetCounter().GetValue(); got != float64(want) {
			t.Errorf("scrape %d: things_total %v", want, got)
		}
	}
}

func TestNoMetricsHandler(t *testing.T) {
	s := start(t, Handlers{}, timeout)
	if resp, _ := do(t, s, "GET", "/metrics", nil); resp.StatusCode != 404 {
		t.Errorf("GET /metrics without a handler: %d; want 404", resp.StatusCode)
	}
	if resp, _ := do(t, s, "GET", "/readyz", nil); resp.StatusCode != 200 {
		t.Errorf("GET /readyz without a Ready func: %d; want 200", resp.StatusCode)
	}
}

// A body the server does not read (up to maxDrain) is not a reset
// connection: the client gets the answer.
func TestBodyIsNotAReset(t *testing.T) {
	s := start(t, Handlers{}, timeout)
	resp, body := do(t, s, "POST", "/healthz", bytes.NewReader(make([]byte, maxDrain-maxHeader)))
	if resp.StatusCode != 405 || body != "GET or HEAD only\n" {
		t.Errorf("POST with a body: %d %q; want 405", resp.StatusCode, body)
	}
}

// raw sends bytes as they are and returns the status line of the answer,
// or "" when the server closed without one.
func raw(t *testing.T, s *Server, request string) string {
	t.Helper()
	c, err := net.Dial("tcp", s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, request); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil && line == "" {
		return ""
	}
	return strings.TrimSpace(line)
}

func TestMalformedRequests(t *testing.T) {
	s := start(t, Handlers{}, timeout)
	for _, c := range []struct{ name, request, want string }{
		{"garbage", "hello\r\n\r\n", "HTTP/1.1 400 Bad Request"},
		{"no target", "GET  HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request"},
		{"HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP/1.1 505 HTTP Version Not Supported"},
		{"header without colon", "GET /healthz HTTP/1.1\r\nHost localhost\r\n\r\n", "HTTP/1.1 400 Bad Request"},
		{"headers too large", "GET /healthz HTTP/1.1\r\nX-Big: " + strings.Repeat("a", maxHeader) + "\r\n\r\n", "HTTP/1.1 431 Request Header Fields Too Large"},
		{"request line too long", "GET /" + strings.Repeat("a", maxHeader) + " HTTP/1.1\r\n\r\n", "HTTP/1.1 431 Request Header Fields Too Large"},
		{"HTTP/1.0", "GET /healthz HTTP/1.0\r\n\r\n", "HTTP/1.1 200 OK"},
		{"bare LF", "GET /healthz HTTP/1.1\nHost: x\n\n", "HTTP/1.1 200 OK"},
		{"closed mid-request", "GET /healthz HTTP/1.1\r\nHost: x\r\n", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			request := c.request
			if c.want == "" {
				// Half-close after the partial request: the server sees
				// the end of the stream and answers nothing.
				conn, err := net.Dial("tcp", s.Addr().String())
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				io.WriteString(conn, request)
				conn.(*net.TCPConn).CloseWrite()
				b, err := io.ReadAll(conn)
				if err != nil || len(b) != 0 {
					t.Errorf("answer %q, %v; want the connection closed without one", b, err)
				}
				return
			}
			if got := raw(t, s, request); got != c.want {
				t.Errorf("status line %q; want %q", got, c.want)
			}
		})
	}
}

// A client that sends nothing is dropped when the connection's time is
// up.
func TestSilentClientIsDropped(t *testing.T) {
	s := start(t, Handlers{}, 50*time.Millisecond)
	c, err := net.Dial("tcp", s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(time.Minute)) // a hang fails rather than blocks the suite
	if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Errorf("read %d, %v; want the server to close the connection", n, err)
	}
}

// Clients that open connections and send nothing cannot keep a probe
// out: past maxConns, the oldest connection is closed to make room.
func TestIdleClientsCannotKeepProbesOut(t *testing.T) {
	s := start(t, Handlers{}, time.Minute)
	var idle []net.Conn
	for range maxConns {
		c, err := net.Dial("tcp", s.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "GET /healthz HTTP/1.1\r\n") // and no end of headers
		idle = append(idle, c)
	}
	for i := range 3 {
		if got := raw(t, s, "GET /healthz HTTP/1.1\r\n\r\n"); got != "HTTP/1.1 200 OK" {
			t.Fatalf("probe %d beside %d idle connections: %q; want an answer", i, maxConns, got)
		}
	}
	// The first idle connections made room, in the order they came.
	idle[0].SetReadDeadline(time.Now().Add(time.Minute)) // a hang fails rather than blocks the suite
	if n, err := idle[0].Read(make([]byte, 1)); n != 0 || err == nil {
		t.Errorf("the oldest idle connection: read %d, %v; want it closed", n, err)
	}
	s.mu.Lock()
	open := len(s.conns)
	s.mu.Unlock()
	if open > maxConns {
		t.Errorf("%d connections open; at most %d", open, maxConns)
	}
}

// Close ends the connections being served and returns.
func TestCloseEndsOpenConnections(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := serve(lis, Handlers{}, time.Minute)
	c, err := net.Dial("tcp", s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /healthz HTTP/1.1\r\n")
	// The request line is read once the server serves the connection.
	for {
		s.mu.Lock()
		n := len(s.conns)
		s.mu.Unlock()
		if n == 1 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	s.Close()
	c.SetReadDeadline(time.Now().Add(time.Minute))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Errorf("read %d, %v after Close; want the connection closed", n, err)
	}
	if _, err := net.Dial("tcp", s.Addr().String()); err == nil {
		t.Error("still listening after Close")
	}
}

func TestListenBadAddress(t *testing.T) {
	if _, err := Listen("no-such-host.invalid:x", Handlers{}); err == nil {
		t.Error("Listen on a bad address: no error")
	}
}
