// Package cli holds what the three agents' main packages share: flags that
// fall back to environment variables, the version flag, logging set-up and
// the mapping of errors to exit codes.
package cli

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/sirupsen/logrus"
	"github.com/spf13/pflag"

	"github.com/gpu-sandbox/gpu-sandbox/internal/version"
)

// Exit codes of every agent.
const (
	ExitOK      = 0
	ExitFailure = 1 // the work failed; the message says what
	ExitUsage   = 2 // bad flags, environment or configuration
)

// UsageError marks an error as the caller's: wrong flags, arguments or
// configuration. It maps to ExitUsage.
type UsageError struct{ Err error }

func (e *UsageError) Error() string { return e.Err.Error() }
func (e *UsageError) Unwrap() error { return e.Err }

// Usagef returns a UsageError with a formatted message.
func Usagef(format string, args ...any) error {
	return &UsageError{Err: fmt.Errorf(format, args...)}
}

// ExitCode maps an error to the agents' exit codes.
func ExitCode(err error) int {
	var u *UsageError
	switch {
	case err == nil:
		return ExitOK
	case errors.As(err, &u):
		return ExitUsage
	}
	return ExitFailure
}

// FlagSet is a pflag set whose flags may also come from the environment.
type FlagSet struct {
	*pflag.FlagSet
	env map[string][]string // flag name → variables, the first set wins
}

// NewFlagSet returns an empty set for the program invoked as os.Args[0],
// with --version and --log-format already defined.
func NewFlagSet(summary string) *FlagSet {
	name := filepath.Base(os.Args[0])
	fs := &FlagSet{FlagSet: pflag.NewFlagSet(name, pflag.ContinueOnError), env: map[string][]string{}}
	fs.SetInterspersed(true) // flags before or after the subcommand
	fs.SortFlags = false
	fs.Usage = func() {
		out := fs.Output()
		fmt.Fprintf(out, "%s\n\nFlags (each also read from the environment variable shown):\n", summary)
		fs.VisitAll(func(f *pflag.Flag) {
			if env := fs.env[f.Name]; len(env) > 0 && !strings.Contains(f.Usage, "$"+env[0]) {
				f.Usage = fmt.Sprintf("%s [$%s]", f.Usage, strings.Join(env, ", $"))
			}
		})
		fmt.Fprint(out, fs.FlagUsages())
	}
	return fs
}

// Env ties a defined flag to environment variables: the first one set
// gives the value (the GPU Operator sets both CONTAINERD_CONFIG and
// RUNTIME_CONFIG, say).
func (fs *FlagSet) Env(flag string, variables ...string) {
	if fs.Lookup(flag) == nil {
		panic("cli: no flag " + flag)
	}
	fs.env[flag] = variables
}

// Parse reads args, then fills every flag not given on the command line from
// its environment variable. It returns the positional arguments, or an
// error: flag.ErrHelp after printing help, a UsageError for bad input.
func (fs *FlagSet) Parse(args []string, environ func(string) (string, bool)) ([]string, error) {
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.FlagSet.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return nil, err
		}
		return nil, &UsageError{Err: err}
	}
	if *showVersion {
		fmt.Fprintf(fs.Output(), "%s %s\n", fs.Name(), version.Version)
		return nil, pflag.ErrHelp
	}
	names := make([]string, 0, len(fs.env))
	for name := range fs.env {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if fs.Changed(name) {
			continue
		}
		for _, variable := range fs.env[name] {
			v, ok := environ(variable)
			if !ok {
				continue
			}
			if err := fs.Set(name, v); err != nil {
				return nil, Usagef("environment variable %s=%q: %v", variable, v, err)
			}
			break
		}
	}
	return fs.Args(), nil
}

// Output is where help and version go.
func (fs *FlagSet) Output() io.Writer { return os.Stdout }

// NewLogger returns a logger writing to w in "text" or "json".
func NewLogger(w io.Writer, format, level string) (*logrus.Logger, error) {
	log := logrus.New()
	log.SetOutput(w)
	switch format {
	case "text", "":
		log.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, DisableColors: true})
	case "json":
		log.SetFormatter(&logrus.JSONFormatter{})
	default:
		return nil, Usagef("--log-format %q: want text or json", format)
	}
	lvl, err := logrus.ParseLevel(level)
	if err != nil {
		return nil, Usagef("--log-level %q: %v", level, err)
	}
	log.SetLevel(lvl)
	return log, nil
}
