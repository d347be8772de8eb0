import { AuthUnavailable, type Session } from '../session';

/** The login form; a successful login makes the session emit its change (main.ts starts the app). */
export function showLogin(section: HTMLElement, session: Session): void {
  section.hidden = false;
  const form = section.querySelector('form')!;
  const error = form.querySelector<HTMLElement>('.error')!;
  const submit = form.querySelector<HTMLButtonElement>('button[type="submit"]')!;
  form.querySelector<HTMLInputElement>('[data-testid="login-user"]')!.focus();
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const data = new FormData(form);
    error.textContent = '';
    submit.disabled = true;
    session
      .login(String(data.get('username') ?? '').trim(), String(data.get('password') ?? ''))
      .catch((reason: unknown) => {
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
