// spdyclient: the client side of Kubernetes streaming over SPDY/3.1, as client-go does it, built on
// moby/spdystream (Debian's golang-github-docker-spdystream-dev) so that vmlet's SPDY server is tested
// against an implementation nobody here wrote.
//
//	spdyclient exec|attach [--stdin] [--tty] [--size WxH] [--protocols P,...] [--status-file F] URL
//	spdyclient portforward [--protocols portforward.k8s.io] URL PORT
//	spdyclient raw [--protocols P,...] URL
//	spdyclient echo-streams [--count N] [--bytes B] URL   (N concurrent streams, each echoed back)
//
// Common options: --method (POST), --ping-period (0: no pings), --ca-file (https; without it the
// server's certificate is not checked: a test tool).
//
// Exit status: exec/attach: the remote exit code for a Failure/NonZeroExitCode status, 0 for Success or
// an empty error stream, 255 with a message on stderr otherwise. portforward: 1 with the error stream's
// text on stderr, 255 for a local failure. raw: 0 once an answer was read.
package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/moby/spdystream"
)

const (
	headerProtocolVersion = "X-Stream-Protocol-Version"
	createStreamTimeout   = 30 * time.Second // client-go's createStreamResponseTimeout
)

var execProtocols = "v5.channel.k8s.io,v4.channel.k8s.io,v3.channel.k8s.io,v2.channel.k8s.io,channel.k8s.io"

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "spdyclient: "+format+"\n", args...)
	os.Exit(255)
}

type options struct {
	method     string
	protocols  string
	statusFile string
	stdin      bool
	tty        bool
	size       string
	pingPeriod time.Duration
	caFile     string
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: spdyclient exec|attach|portforward|raw [options] URL [PORT]")
	}
	mode := os.Args[1]
	var o options
	fs := flag.NewFlagSet(mode, flag.ExitOnError)
	fs.StringVar(&o.method, "method", "POST", "HTTP method of the upgrade request")
	fs.StringVar(&o.caFile, "ca-file", "", "CA certificate for https URLs")
	fs.DurationVar(&o.pingPeriod, "ping-period", 0, "send a SPDY PING this often (0: never)")
	defaultProtocols := execProtocols
	if mode == "portforward" {
		defaultProtocols = "portforward.k8s.io"
	}
	fs.StringVar(&o.protocols, "protocols", defaultProtocols, "protocols offered, comma-separated")
	if mode == "exec" || mode == "attach" {
		fs.BoolVar(&o.stdin, "stdin", false, "send this process's stdin")
		fs.BoolVar(&o.tty, "tty", false, "a terminal session (no stderr stream; a resize stream from v3)")
		fs.StringVar(&o.size, "size", "", "with --tty: send this terminal size (WxH) on the resize stream")
		fs.StringVar(&o.statusFile, "status-file", "", "write {protocol, error} here as JSON")
	}
	count := fs.Int("count", 8, "echo-streams: how many streams")
	nbytes := fs.Int("bytes", 1<<17, "echo-streams: bytes sent on each")
	fs.Parse(os.Args[2:])
	args := fs.Args()

	switch mode {
	case "exec", "attach":
		if len(args) != 1 {
			fail("%s: want exactly one URL, got %q", mode, args)
		}
		os.Exit(remoteCommand(o, args[0]))
	case "portforward":
		if len(args) != 2 {
			fail("portforward: want URL PORT, got %q", args)
		}
		os.Exit(portForward(o, args[0], args[1]))
	case "raw":
		if len(args) != 1 {
			fail("raw: want exactly one URL, got %q", args)
		}
		os.Exit(raw(o, args[0]))
	case "echo-streams":
		if len(args) != 1 {
			fail("echo-streams: want exactly one URL, got %q", args)
		}
		os.Exit(echoStreams(o, args[0], *count, *nbytes))
	default:
		fail("unknown mode %q (exec, attach, portforward, raw, echo-streams)", mode)
	}
}

// bufConn hands spdystream the bytes the HTTP reader already buffered past the 101 answer.
type bufConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufConn) Read(p []byte) (int, error) { return c.r.Read(p) }

func dial(o options, u *url.URL) (net.Conn, error) {
	host := u.Host
	switch u.Scheme {
	case "http":
		if u.Port() == "" {
			host = net.JoinHostPort(u.Hostname(), "80")
		}
		return net.DialTimeout("tcp", host, 10*time.Second)
	case "https":
		if u.Port() == "" {
			host = net.JoinHostPort(u.Hostname(), "443")
		}
		cfg := &tls.Config{ServerName: u.Hostname()}
		if o.caFile != "" {
			pem, err := os.ReadFile(o.caFile)
			if err != nil {
				return nil, err
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("%s: no PEM certificate", o.caFile)
			}
			cfg.RootCAs = pool
		} else {
			cfg.InsecureSkipVerify = true
		}
		return tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", host, cfg)
	}
	return nil, fmt.Errorf("URL scheme %q: want http or https", u.Scheme)
}

// upgrade sends the upgrade request as client-go's SpdyRoundTripper does and reads the answer.
// It returns the connection only for a 101 with Upgrade: SPDY/3.1.
func upgrade(o options, rawURL string) (*http.Response, net.Conn, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, nil, err
	}
	conn, err := dial(o, u)
	if err != nil {
		return nil, nil, err
	}
	req, err := http.NewRequest(o.method, rawURL, nil)
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "SPDY/3.1")
	for _, p := range strings.Split(o.protocols, ",") {
		if p = strings.TrimSpace(p); p != "" {
			req.Header.Add(headerProtocolVersion, p)
		}
	}
	if err := req.Write(conn); err != nil {
		conn.Close()
		return nil, nil, err
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("reading the upgrade answer: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return resp, conn, nil
	}
	if !strings.EqualFold(resp.Header.Get("Upgrade"), "SPDY/3.1") ||
		!strings.Contains(strings.ToLower(resp.Header.Get("Connection")), "upgrade") {
		conn.Close()
		return resp, nil, fmt.Errorf("101 answer without Connection: Upgrade / Upgrade: SPDY/3.1 (got %q / %q)",
			resp.Header.Get("Connection"), resp.Header.Get("Upgrade"))
	}
	return resp, &bufConn{conn, br}, nil
}

func connect(o options, rawURL string) (*spdystream.Connection, string) {
	resp, conn, err := upgrade(o, rawURL)
	if err != nil {
		fail("%v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		conn.Close()
		fail("upgrade refused: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	sc, err := spdystream.NewConnection(conn, false)
	if err != nil {
		fail("spdy connection: %v", err)
	}
	// The server opens no streams in these protocols: refuse any (client-go rejects them too).
	go sc.Serve(func(s *spdystream.Stream) { s.Refuse() })
	if o.pingPeriod > 0 {
		go func() {
			for {
				time.Sleep(o.pingPeriod)
				if _, err := sc.Ping(); err != nil {
					return
				}
				fmt.Fprintln(os.Stderr, "spdyclient: ping ok")
			}
		}()
	}
	return sc, resp.Header.Get(headerProtocolVersion)
}

func createStream(sc *spdystream.Connection, h http.Header) *spdystream.Stream {
	s, err := sc.CreateStream(h, nil, false)
	if err != nil {
		fail("creating the %s stream: %v", h.Get("streamType"), err)
	}
	if err := s.WaitTimeout(createStreamTimeout); err != nil {
		fail("waiting for the reply to the %s stream: %v", h.Get("streamType"), err)
	}
	return s
}

func raw(o options, rawURL string) int {
	resp, conn, err := upgrade(o, rawURL)
	if err != nil {
		fail("%v", err)
	}
	fmt.Printf("%s %s\n", resp.Proto, resp.Status)
	fmt.Printf("protocol: %s\n", resp.Header.Get(headerProtocolVersion))
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		if len(body) > 0 {
			fmt.Fprintf(os.Stderr, "%s\n", strings.TrimSpace(string(body)))
		}
	}
	if conn != nil {
		conn.Close()
	}
	return 0
}

// status is the part of metav1.Status that client-go's v4 error decoder reads.
type status struct {
	Status  string `json:"status"`
	Message string `json:"message"`
	Reason  string `json:"reason"`
	Details *struct {
		Causes []struct {
			Type    string `json:"reason"`
			Message string `json:"message"`
		} `json:"causes"`
	} `json:"details"`
}

// exitCode decodes the error stream as client-go does for the negotiated protocol.
func exitCode(protocol string, message []byte) (int, error) {
	if len(message) == 0 {
		return 0, nil
	}
	if protocol != "v4.channel.k8s.io" && protocol != "v5.channel.k8s.io" {
		return 0, fmt.Errorf("error executing remote command: %s", message)
	}
	var st status
	if err := json.Unmarshal(message, &st); err != nil {
		return 0, fmt.Errorf("error stream protocol error: %v in %q", err, message)
	}
	switch st.Status {
	case "Success":
		return 0, nil
	case "Failure":
		if st.Reason != "NonZeroExitCode" {
			return 0, errors.New(st.Message)
		}
		if st.Details == nil {
			return 0, errors.New("error stream protocol error: details must be set")
		}
		for _, c := range st.Details.Causes {
			if c.Type != "ExitCode" {
				continue
			}
			rc, err := strconv.ParseUint(c.Message, 10, 8)
			if err != nil {
				return 0, fmt.Errorf("error stream protocol error: invalid exit code value %q", c.Message)
			}
			return int(rc), nil
		}
		return 0, errors.New("error stream protocol error: no ExitCode cause given")
	}
	return 0, errors.New("error stream protocol error: unknown error")
}

func remoteCommand(o options, rawURL string) int {
	sc, protocol := connect(o, rawURL)
	var streams []*spdystream.Stream
	h := http.Header{}
	// client-go's order: error, stdin, stdout, stderr (not with a tty), resize (tty, from v3 on).
	h.Set("streamType", "error")
	errorStream := createStream(sc, h)
	streams = append(streams, errorStream)
	var stdin *spdystream.Stream
	if o.stdin {
		h.Set("streamType", "stdin")
		stdin = createStream(sc, h)
		streams = append(streams, stdin)
	}
	h.Set("streamType", "stdout")
	stdout := createStream(sc, h)
	streams = append(streams, stdout)
	var stderr *spdystream.Stream
	if !o.tty {
		h.Set("streamType", "stderr")
		stderr = createStream(sc, h)
		streams = append(streams, stderr)
	}
	var resize *spdystream.Stream
	if o.tty && (protocol == "v3.channel.k8s.io" || protocol == "v4.channel.k8s.io" || protocol == "v5.channel.k8s.io") {
		h = http.Header{}
		h.Set("streamType", "resize")
		resize = createStream(sc, h)
		streams = append(streams, resize)
	}

	errorChan := make(chan []byte, 1)
	go func() {
		message, _ := io.ReadAll(errorStream)
		errorChan <- message
	}()
	if resize != nil && o.size != "" {
		var w, hgt uint16
		if _, err := fmt.Sscanf(o.size, "%dx%d", &w, &hgt); err != nil {
			fail("--size %q: want WIDTHxHEIGHT", o.size)
		}
		json.NewEncoder(resize).Encode(map[string]uint16{"Width": w, "Height": hgt})
	}
	if stdin != nil {
		var once sync.Once
		go func() {
			defer once.Do(func() { stdin.Close() })
			io.Copy(stdin, os.Stdin)
		}()
		go func() {
			// Waits for the server to close its side of stdin, as client-go does.
			defer once.Do(func() { stdin.Close() })
			io.Copy(io.Discard, stdin)
		}()
	}
	var wg sync.WaitGroup
	copyOut := func(dst io.Writer, src io.Reader) {
		defer wg.Done()
		io.Copy(dst, src)
		io.Copy(io.Discard, src)
	}
	wg.Add(1)
	go copyOut(os.Stdout, stdout)
	if stderr != nil {
		wg.Add(1)
		go copyOut(os.Stderr, stderr)
	}
	wg.Wait()
	message := <-errorChan

	if o.statusFile != "" {
		out, _ := json.Marshal(map[string]string{"protocol": protocol, "error": string(message)})
		if err := os.WriteFile(o.statusFile, out, 0o644); err != nil {
			fmt.Fprintf(os.Stderr, "spdyclient: writing %s: %v\n", o.statusFile, err)
		}
	}
	// Tear down as client-go's connection.Close does: reset every stream, then GOAWAY.
	for _, s := range streams {
		s.Reset()
	}
	sc.Close()
	rc, err := exitCode(protocol, message)
	if err != nil {
		fmt.Fprintf(os.Stderr, "spdyclient: %v\n", err)
		return 255
	}
	return rc
}

func portForward(o options, rawURL, port string) int {
	sc, _ := connect(o, rawURL)
	h := http.Header{}
	h.Set("streamType", "error")
	h.Set("port", port)
	h.Set("requestID", "0")
	errorStream := createStream(sc, h)
	errorStream.Close() // client-go: "we're not writing to this stream"
	errorChan := make(chan []byte, 1)
	go func() {
		message, _ := io.ReadAll(errorStream)
		errorChan <- message
	}()
	h.Set("streamType", "data")
	data := createStream(sc, h)

	remoteDone := make(chan struct{})
	localError := make(chan struct{})
	go func() {
		io.Copy(os.Stdout, data)
		close(remoteDone)
	}()
	go func() {
		defer data.Close()
		if _, err := io.Copy(data, os.Stdin); err != nil {
			close(localError)
		}
	}()
	select {
	case <-remoteDone:
	case <-localError:
	}
	data.Reset()
	message := <-errorChan
	errorStream.Reset()
	sc.Close()
	if len(message) > 0 {
		fmt.Fprintf(os.Stderr, "%s\n", message)
		return 1
	}
	return 0
}

// echoStreams opens count streams at once, sends size bytes (different on each) and its FIN on each,
// and checks that the same bytes come back. Prints ok/refused/failed counts; exit 0 when none failed.
func echoStreams(o options, rawURL string, count, size int) int {
	sc, _ := connect(o, rawURL)
	var mu sync.Mutex
	ok, refused, failed := 0, 0, 0
	var wg sync.WaitGroup
	for i := 0; i < count; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			h := http.Header{}
			h.Set("streamType", "echo")
			h.Set("index", strconv.Itoa(i))
			s, err := sc.CreateStream(h, nil, false)
			result := &failed
			defer func() { mu.Lock(); *result++; mu.Unlock() }()
			if err != nil {
				fmt.Fprintf(os.Stderr, "stream %d: %v\n", i, err)
				return
			}
			if err := s.WaitTimeout(createStreamTimeout); err != nil {
				if err == spdystream.ErrReset {
					result = &refused
				} else {
					fmt.Fprintf(os.Stderr, "stream %d: %v\n", i, err)
				}
				return
			}
			want := make([]byte, size)
			x := uint32(i*2654435761 + 1)
			for j := range want {
				x ^= x << 13
				x ^= x >> 17
				x ^= x << 5
				want[j] = byte(x)
			}
			go func() {
				for off := 0; off < len(want); off += 32 * 1024 {
					end := off + 32*1024
					if end > len(want) {
						end = len(want)
					}
					if _, err := s.Write(want[off:end]); err != nil {
						return
					}
				}
				s.Close()
			}()
			got, err := io.ReadAll(s)
			if err != nil || string(got) != string(want) {
				fmt.Fprintf(os.Stderr, "stream %d: %d bytes back of %d (%v)\n", i, len(got), len(want), err)
				return
			}
			result = &ok
		}(i)
	}
	wg.Wait()
	fmt.Printf("ok=%d refused=%d failed=%d\n", ok, refused, failed)
	sc.Close()
	if failed > 0 {
		return 1
	}
	return 0
}
