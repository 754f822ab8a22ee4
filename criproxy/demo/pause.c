/*
 * Minimal pod "pause" process for `criproxy demo` and the end-to-end tests
 * (criproxy/demo/ociimage.py compiles it with gcc -static into the pause image).
 *
 * It does nothing but wait: SIGTERM or SIGINT makes it exit with status 0,
 * and SIGCHLD makes it reap every exited child (it is PID 1 of the pod).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>

static volatile sig_atomic_t stop_requested;

static void on_stop(int signo)
{
	(void)signo;
	stop_requested = 1;
}

static void on_child(int signo)
{
	int saved_errno = errno;

	(void)signo;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
	errno = saved_errno;
}

static int install(int signo, void (*handler)(int))
{
	struct sigaction action;

	memset(&action, 0, sizeof(action));
	action.sa_handler = handler;
	action.sa_flags = SA_RESTART;
	sigemptyset(&action.sa_mask);
	return sigaction(signo, &action, NULL);
}

int main(void)
{
	sigset_t blocked, waiting;

	/* Keep the signals blocked except inside sigsuspend() so that a stop
	 * request can never slip in between the check and the wait. */
	sigemptyset(&blocked);
	sigaddset(&blocked, SIGTERM);
	sigaddset(&blocked, SIGINT);
	sigaddset(&blocked, SIGCHLD);
	if (sigprocmask(SIG_BLOCK, &blocked, &waiting) != 0 ||
	    install(SIGTERM, on_stop) != 0 || install(SIGINT, on_stop) != 0 ||
	    install(SIGCHLD, on_child) != 0) {
		perror("pause: signal setup");
		return 1;
	}
	sigdelset(&waiting, SIGTERM);
	sigdelset(&waiting, SIGINT);
	sigdelset(&waiting, SIGCHLD);
	while (!stop_requested)
		sigsuspend(&waiting);
	return 0;
}
