// Placeholder until the frontend bundle is built (frontend/ writes this file).
export async function render() {
  const message = document.createElement('p');
  message.textContent = 'Concept Evolution: the frontend bundle is not built yet. ' +
      'The data routes are served under /data/plugin/conceptevo/.';
  document.body.appendChild(message);
}
