// Package probe serves an agent's /healthz, /readyz and /metrics: what the
// kubelet's httpGet probes and a Prometheus scrape ask for, over HTTP/1.1,
// one request per connection, and nothing more.
//
// It is written on net and net/textproto rather than net/http because the
// device plugin links no other part of net/http's server: http.Server
// brings the TLS handshake, HTTP/2 and the rest into the binary, about
// 1.6 MB of code and read-only data, which the plugin on every GPU node
// would map for three fixed answers. The agents that need net/http anyway
// (kata-manager's registry client, vfio-manager's API-server client) use
// this package too, so that every agent answers its probes alike.
package probe

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"strings"
	"sync"
	"time"
)

// Handlers say what the endpoints answer.
type Handlers struct {
	// Ready returns why the agent is not ready, "" when it is: /readyz
	// answers 503 with the reason, or 200. Nil is always ready.
	Ready func() string
	// Metrics writes the Prometheus text exposition format for /metrics.
	// Nil serves no /metrics.
	Metrics func(w io.Writer)
}

const (
	// timeout bounds a connection from accept to close, as http.Server's
	// ReadHeaderTimeout would bound its request: a probe takes
	// milliseconds, a client that sends nothing is dropped.
	timeout = 5 * time.Second
	// maxHeader bounds the request line and headers together; a probe's
	// are about 150 bytes.
	maxHeader = 16 << 10
	// maxConns bounds the connections served at once. Past it, the
	// oldest is closed to make room: clients that open connections and
	// send nothing cannot keep the kubelet's probes out (it would restart
	// the agent), since each probe sends its request at once.
	maxConns = 32
	// maxDrain bounds what is read from a client after its answer, as
	// net/http bounds it.
	maxDrain = 256 << 10
	// metricsType is the Prometheus text format's content type.
	metricsType = "text/plain; version=0.0.4; charset=utf-8"
	// dateFormat is HTTP's date (RFC 9110's IMF-fixdate).
	dateFormat = "Mon, 02 Jan 2006 15:04:05 GMT"
)

// Server serves the endpoints on one listener.
type Server struct {
	lis     net.Listener
	h       Handlers
	timeout time.Duration

	mu     sync.Mutex
	conns  map[net.Conn]time.Time // open connections, by when accepted
	closed bool
	wg     sync.WaitGroup
}

// Listen serves the endpoints on a TCP address ("host:port", ":8081")
// until Close.
func Listen(addr string, h Handlers) (*Server, error) {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	return serve(lis, h, timeout), nil
}

func serve(lis net.Listener, h Handlers, timeout time.Duration) *Server {
	s := &Server{lis: lis, h: h, timeout: timeout, conns: map[net.Conn]time.Time{}}
	s.wg.Add(1)
	go s.accept()
	return s
}

// Addr is the address served, with the port chosen for ":0".
func (s *Server) Addr() net.Addr { return s.lis.Addr() }

// Close stops serving: the listener and every open connection are closed,
// and Close returns when their goroutines have ended.
func (s *Server) Close() {
	s.mu.Lock()
	s.closed = true
	_ = s.lis.Close()
	for c := range s.conns {
		_ = c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

func (s *Server) accept() {
	defer s.wg.Done()
	var delay time.Duration
	for {
		c, err := s.lis.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors, say: wait a little, as
			// http.Server does, rather than spin.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			time.Sleep(delay)
			continue
		}
		delay = 0
		if !s.track(c) {
			_ = c.Close()
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer s.untrack(c)
			s.serveConn(c)
		}()
	}
}

// track adds a connection, closing the oldest when maxConns are open; it
// reports false once the server is closed.
func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	if len(s.conns) >= maxConns {
		var oldest net.Conn
		var at time.Time
		for o, t := range s.conns {
			if oldest == nil || t.Before(at) {
				oldest, at = o, t
			}
		}
		_ = oldest.Close() // its goroutine ends and untracks it
		delete(s.conns, oldest)
	}
	s.conns[c] = time.Now()
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	_ = c.Close()
}

// response is what one request gets.
type response struct {
	code        int
	contentType string
	allow       string // for 405
	body        []byte
}

func text(code int, body string) response {
	return response{code: code, contentType: "text/plain; charset=utf-8", body: []byte(body)}
}

func (s *Server) serveConn(c net.Conn) {
	_ = c.SetDeadline(time.Now().Add(s.timeout))
	limited := &io.LimitedReader{R: c, N: maxHeader}
	r := textproto.NewReader(bufio.NewReaderSize(limited, 4096))
	resp, head := s.read(r, limited)
	if resp.code == 0 {
		return // the client closed or timed out before a whole request
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nX-Content-Type-Options: nosniff\r\nDate: %s\r\nConnection: close\r\n",
		resp.code, statusText(resp.code), resp.contentType, len(resp.body), time.Now().UTC().Format(dateFormat))
	if resp.allow != "" {
		fmt.Fprintf(&b, "Allow: %s\r\n", resp.allow)
	}
	b.WriteString("\r\n")
	if !head {
		b.Write(resp.body)
	}
	if _, err := c.Write(b.Bytes()); err != nil {
		return
	}
	// Close our side and let the client close its own once it has read
	// the answer: closed with unread bytes from the client (a body), the
	// socket would reset the connection, and the answer could be lost.
	// The deadline and maxDrain still bound the wait.
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
		_, _ = io.CopyN(io.Discard, c, maxDrain)
	}
}

// read reads one request and decides its answer; a zero code means there
// is no one to answer. head is true for a HEAD request.
func (s *Server) read(r *textproto.Reader, limited *io.LimitedReader) (resp response, head bool) {
	tooLong := func() bool { return limited.N <= 0 }
	line, err := r.ReadLine()
	if err != nil {
		if tooLong() {
			return text(431, "request line too long\n"), false
		}
		return response{}, false
	}
	method, target, proto, ok := parseRequestLine(line)
	if !ok {
		return text(400, "malformed request line\n"), false
	}
	if !strings.HasPrefix(proto, "HTTP/1.") {
		return text(505, "HTTP/1.x only\n"), false
	}
	if _, err := r.ReadMIMEHeader(); err != nil {
		if tooLong() {
			return text(431, "request headers too large\n"), false
		}
		var perr textproto.ProtocolError
		if errors.As(err, &perr) {
			return text(400, "malformed header\n"), false
		}
		return response{}, false
	}
	head = method == "HEAD"
	if method != "GET" && !head {
		resp := text(405, "GET or HEAD only\n")
		resp.allow = "GET, HEAD"
		return resp, false
	}
	path, _, _ := strings.Cut(target, "?")
	switch {
	case path == "/healthz":
		return text(200, "ok\n"), head
	case path == "/readyz":
		if s.h.Ready != nil {
			if reason := s.h.Ready(); reason != "" {
				return text(503, "not ready: "+reason+"\n"), head
			}
		}
		return text(200, "ok\n"), head
	case path == "/metrics" && s.h.Metrics != nil:
		var b bytes.Buffer
		s.h.Metrics(&b)
		return response{code: 200, contentType: metricsType, body: b.Bytes()}, head
	}
	return text(404, "not found: "+path+"\n"), head
}

// parseRequestLine splits "GET /readyz HTTP/1.1".
func parseRequestLine(line string) (method, target, proto string, ok bool) {
	method, rest, ok1 := strings.Cut(line, " ")
	target, proto, ok2 := strings.Cut(rest, " ")
	if !ok1 || !ok2 || method == "" || target == "" || strings.Contains(proto, " ") {
		return "", "", "", false
	}
	return method, target, proto, true
}

func statusText(code int) string {
	switch code {
	case 200:
		return "OK"
	case 400:
		return "Bad Request"
	case 404:
		return "Not Found"
	case 405:
		return "Method Not Allowed"
	case 431:
		return "Request Header Fields Too Large"
	case 503:
		return "Service Unavailable"
	case 505:
		return "HTTP Version Not Supported"
	}
	return ""
}
