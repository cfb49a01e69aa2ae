package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"
)

// listener is what kfake listens on: the TCP listener, reporting the
// advertised address (kfake puts its listener's Addr into metadata answers),
// plus in-memory connections of the broker's own startup client. TCP
// connections are accepted only once open is called, so no client sees the
// broker before its startup repair is done (they wait in the kernel's
// backlog meanwhile).
type listener struct {
	tcp   net.Listener
	adv   hostPortAddr
	conns chan net.Conn

	openOnce  sync.Once
	closeOnce sync.Once
	closed    chan struct{}
}

func newListener(tcp net.Listener, adv hostPortAddr) *listener {
	return &listener{tcp: tcp, adv: adv, conns: make(chan net.Conn), closed: make(chan struct{})}
}

// Accept implements net.Listener.
func (l *listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

// Close implements net.Listener.
func (l *listener) Close() error {
	err := net.ErrClosed
	l.closeOnce.Do(func() {
		close(l.closed)
		err = l.tcp.Close()
	})
	return err
}

// Addr returns the advertised address.
func (l *listener) Addr() net.Addr { return l.adv }

// Bound returns the address the TCP listener is bound to.
func (l *listener) Bound() net.Addr { return l.tcp.Addr() }

// open starts handing TCP connections to kfake.
func (l *listener) open() {
	l.openOnce.Do(func() { go l.acceptTCP() })
}

func (l *listener) acceptTCP() {
	backoff := 5 * time.Millisecond
	for {
		c, err := l.tcp.Accept()
		if err != nil {
			select {
			case <-l.closed:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: wait, like
			// net/http's server does.
			time.Sleep(backoff)
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		select {
		case l.conns <- c:
		case <-l.closed:
			c.Close()
			return
		}
	}
}

// dial connects an in-process client to the broker without TCP, whatever
// address it asks for (a kgo.Dialer).
func (l *listener) dial(ctx context.Context, _, _ string) (net.Conn, error) {
	client, server := net.Pipe()
	select {
	case l.conns <- server:
		return client, nil
	case <-l.closed:
		return nil, net.ErrClosed
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// hostPortAddr is a net.Addr that is just a host:port string.
type hostPortAddr string

// Network implements net.Addr.
func (hostPortAddr) Network() string { return "tcp" }

// String implements net.Addr.
func (a hostPortAddr) String() string { return string(a) }

// advertised returns the address to advertise for a listener bound to
// bound: adv, or if adv is empty the bound address with an unspecified host
// replaced by 127.0.0.1. A zero port in adv means the bound port.
func advertised(bound net.Addr, adv string) (hostPortAddr, error) {
	tcp, ok := bound.(*net.TCPAddr)
	if !ok {
		return "", fmt.Errorf("listener address %v is not TCP", bound)
	}
	host, port := "", 0
	if adv != "" {
		var err error
		if host, port, err = splitHostPort(adv); err != nil {
			return "", fmt.Errorf("--advertise: %w", err)
		}
	}
	if host == "" {
		host = tcp.IP.String()
		if tcp.IP == nil || tcp.IP.IsUnspecified() {
			host = "127.0.0.1"
		}
	}
	if port == 0 {
		port = tcp.Port
	}
	return hostPortAddr(net.JoinHostPort(host, strconv.Itoa(port))), nil
}
