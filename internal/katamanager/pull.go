package katamanager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/gpu-sandbox/gpu-sandbox/internal/cli"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/artifacts"
)

// PullConfig is the "kata-manager pull" subcommand's input.
type PullConfig struct {
	Reference  string
	Dir        string
	PlainHTTP  bool
	CAFile     string
	PullSecret string // file holding a .dockerconfigjson
	Platform   string
	Out        io.Writer
	Log        *logrus.Logger
}

// Pull pulls one artifact into a directory and prints its digest and files.
func Pull(ctx context.Context, cfg PullConfig) error {
	opts := artifacts.Options{PlainHTTP: cfg.PlainHTTP, CAFile: cfg.CAFile, Platform: cfg.Platform,
		Progress: progressLogger(cfg.Log, cfg.Reference)}
	if cfg.PullSecret != "" {
		b, err := os.ReadFile(cfg.PullSecret)
		if err != nil {
			return cli.Usagef("--pull-secret: %v", err)
		}
		opts.DockerConfig = b
	}
	if _, err := artifacts.ParseReference(cfg.Reference); err != nil {
		return &cli.UsageError{Err: err}
	}
	res, err := artifacts.Pull(ctx, cfg.Reference, cfg.Dir, opts)
	if errors.Is(err, artifacts.ErrInvalidOptions) {
		return &cli.UsageError{Err: err}
	}
	if err != nil {
		return err
	}
	state := "pulled"
	if !res.Changed {
		state = "unchanged, nothing downloaded"
	}
	fmt.Fprintf(cfg.Out, "%s: %s\ndigest: %s\n", res.Reference, state, res.Digest)
	for _, f := range res.Files {
		fmt.Fprintf(cfg.Out, "  %s/%s  %s  %d bytes\n", cfg.Dir, f.Name, f.Digest, f.Size)
	}
	return nil
}

// progressLogger turns download progress into log lines: at the start and
// end of each blob, and at most every two seconds in between.
func progressLogger(log *logrus.Logger, ref string) func(artifacts.Progress) {
	var mu sync.Mutex
	last := map[string]time.Time{}
	return func(p artifacts.Progress) {
		mu.Lock()
		defer mu.Unlock()
		now := time.Now()
		if p.Done != 0 && p.Done != p.Total && now.Sub(last[p.Title]) < 2*time.Second {
			return
		}
		last[p.Title] = now
		log.WithFields(logrus.Fields{"reference": ref, "file": p.Title, "done": p.Done, "total": p.Total}).
			Infof("download %s: %s of %s", p.Title, mib(p.Done), mib(p.Total))
	}
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }
