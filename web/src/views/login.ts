import { AuthUnavailable, LoginLocked, MfaRequired, type Session } from '../session';

/** "4 min 56 s", "45 s", "1 h 5 min". */
export function duration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min${s % 60 ? ` ${s % 60} s` : ''}`;
  const minutes = Math.round((s % 3600) / 60);
  return `${Math.floor(s / 3600)} h${minutes ? ` ${minutes} min` : ''}`;
}

/** The fields of every page's login form (the page gives its title and hint). */
const FIELDS = `
  <label>User <input name="username" data-testid="login-user" autocomplete="username" required /></label>
  <label>Password
    <input name="password" type="password" data-testid="login-password" autocomplete="current-password" required />
  </label>
  <label class="otp" hidden>Code (authenticator app or recovery code)
    <input name="otp" data-testid="login-otp" autocomplete="one-time-code" />
  </label>
  <button type="submit" data-testid="login-submit">Log in</button>
  <p class="error" role="alert" data-testid="login-error"></p>`;

/** The login form; a successful login makes the session emit its change (main.ts starts the app). */
export function showLogin(section: HTMLElement, session: Session): void {
  section.hidden = false;
  const form = section.querySelector('form')!;
  form.insertAdjacentHTML('beforeend', FIELDS);
  const error = form.querySelector<HTMLElement>('.error')!;
  const submit = form.querySelector<HTMLButtonElement>('button[type="submit"]')!;
  let countdown: number | undefined;
  form.querySelector<HTMLInputElement>('[data-testid="login-user"]')!.focus();

  /** "locked for 4 min 56 s", counting down to the moment auth takes logins again. */
  const showLocked = (username: string, locked: LoginLocked): void => {
    const until = new Date(locked.until).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
    const render = (): void => {
      const left = (locked.until - Date.now()) / 1000;
      if (left <= 0) {
        window.clearInterval(countdown);
        error.textContent = `${username} may log in again.`;
        error.dataset.state = '';
        return;
      }
      error.textContent =
        `Too many failed logins: ${username} is locked for ${duration(left)} (until ${until}). ` +
        'Check the password and try again then.';
    };
    error.dataset.state = 'locked';
    render();
    countdown = window.setInterval(render, 1000);
  };

  // The password was right and a second factor is due: the code field, with the login's mfa_token.
  const otp = form.querySelector<HTMLElement>('.otp');
  let pending: { username: string; mfaToken: string } | null = null;
  const askForCode = (username: string, required: MfaRequired): void => {
    pending = { username, mfaToken: required.mfaToken };
    if (otp) otp.hidden = false;
    form.querySelector<HTMLInputElement>('[data-testid="login-otp"]')?.focus();
    error.dataset.state = 'mfa';
    error.textContent = 'Enter the code from your authenticator app, or a recovery code.';
  };

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const username = String(data.get('username') ?? '').trim();
    window.clearInterval(countdown);
    error.textContent = '';
    error.dataset.state = '';
    submit.disabled = true;
    const attempt =
      pending && pending.username === username
        ? session.completeMfa(username, pending.mfaToken, String(data.get('otp') ?? ''))
        : session.login(username, String(data.get('password') ?? ''));
    attempt
      .catch((reason: unknown) => {
        if (reason instanceof MfaRequired) askForCode(username, reason);
        else if (reason instanceof LoginLocked) showLocked(username, reason);
        else
          error.textContent =
            reason instanceof AuthUnavailable
              ? `auth is not reachable: ${reason.message}`
              : `Login failed: ${reason instanceof Error ? reason.message : String(reason)}`;
      })
      .finally(() => {
        submit.disabled = false;
      });
  });
}
