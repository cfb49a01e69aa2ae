package s3test

import (
	"os/exec"
	"syscall"
)

// setDeathSignal kills the server if the test process dies without
// stopping it (a test timeout's panic, a kill).
func setDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
